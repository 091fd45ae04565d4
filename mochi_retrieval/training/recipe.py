"""What a modality brings to a training run: its data, its model, its evaluation and its export.

:func:`mochi_retrieval.training.runner.run` drives any :class:`Recipe` along one path:
``build`` -> :class:`~mochi_retrieval.training.loop.Trainer` -> ``finish``.
:func:`recipe_for` picks the recipe for a config (``data.dataset``).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..config import ExperimentConfig
from .loop import TrainData, Trainer, TrainerSettings


class Recipe:
    """One modality's part of a run. Subclasses implement :meth:`build` and :meth:`finish`.

    Args:
        cfg: the whole run's config.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def build(self, accelerator) -> tuple[TrainData, nn.Module]:
        """The training batches (sharded for this process) and the model."""
        raise NotImplementedError

    def step_hook(self) -> Callable[..., dict[str, float]] | None:
        """Diagnostics every ``train.diagnostics_every`` steps (see :class:`Trainer`), or None."""
        return None

    def epoch_hook(self, model: nn.Module) -> Callable[[int], dict[str, float]] | None:
        """Called after each epoch (e.g. a kNN monitor), or None."""
        return None

    def finish(self, model: nn.Module, trainer: Trainer, train_seconds: float, out: Path) -> dict[str, float]:
        """On the main process after training: evaluate, export into ``out``; returns the final metrics."""
        raise NotImplementedError


def settings_from(cfg: ExperimentConfig) -> TrainerSettings:
    """The loop's settings from the ``train`` section (and the seed)."""
    t = cfg.train
    return TrainerSettings(
        epochs=t.epochs, max_steps=t.max_steps, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
        weight_decay=t.weight_decay, warmup_epochs=t.warmup_epochs, schedule=t.schedule,
        grad_accum_steps=t.grad_accum_steps, log_every=t.log_every, diagnostics_every=t.diagnostics_every,
        checkpoint_every_epochs=t.checkpoint_every_epochs, checkpoint_every_steps=t.checkpoint_every_steps,
        checkpoint_every_minutes=t.checkpoint_every_minutes, keep_checkpoints=t.keep_checkpoints,
        resume=t.resume, seed=cfg.seed,
        max_grad_norm=t.max_grad_norm, weight_decay_1d=t.weight_decay_1d)


def fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: model, data and method settings."""
    data = asdict(cfg.data)
    data.pop("skip_corrupt_images")  # turned on to get past a bad file, a run must still resume
    found = {"model": asdict(cfg.model), "data": data, "moco": asdict(cfg.moco),
             "mochi": asdict(cfg.mochi), "bank": asdict(cfg.bank), "batch_size": cfg.train.batch_size, "seed": cfg.seed}
    if cfg.false_negatives.enabled:  # absent when off: checkpoints written before the section still resume
        found["false_negatives"] = asdict(cfg.false_negatives)
    return found


def default_fingerprint() -> dict[str, Any]:
    """The fingerprint of the library's default config: a setting at its default is left out of the
    comparison on resume, so a checkpoint written before the setting existed still resumes."""
    return fingerprint(ExperimentConfig())


def local_batch(cfg: ExperimentConfig) -> int:
    """Items per micro-batch summed over processes (``train.batch_size / train.grad_accum_steps``)."""
    t = cfg.train
    if t.batch_size % t.grad_accum_steps:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by "
                         f"train.grad_accum_steps={t.grad_accum_steps}")
    return t.batch_size // t.grad_accum_steps


def recipe_for(cfg: ExperimentConfig) -> Recipe:
    """The text recipe for ``data.dataset: text_pairs | debian``, the image recipe otherwise."""
    if cfg.data.is_text:
        from .text import TextRecipe

        return TextRecipe(cfg)
    from .image import ImageRecipe

    return ImageRecipe(cfg)
