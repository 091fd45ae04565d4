"""The training loop: the only code that starts distributed work (through accelerate).

It owns the optimiser, schedule, mixed precision, gradient accumulation,
checkpoints (atomic; resumable mid-epoch), logging (tqdm, JSON lines,
TensorBoard), the NaN guard and evaluator hooks. The model is any module whose
forward takes a batch dict and returns a dict with a scalar ``loss``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .distributed import replicas_agree

logger = logging.getLogger(__name__)


class TrainData(Protocol):
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]: ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainerSettings:
    """Plain settings of the loop (the training program fills them from the config)."""

    epochs: int = 200
    max_steps: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    grad_accum_steps: int = 1
    log_every: int = 50
    diagnostics_every: int = 200
    checkpoint_every_epochs: int = 1
    resume: bool = True
    seed: int = 0
    max_grad_norm: float | None = None
    weight_decay_1d: bool = True


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimiser step ``step``: linear warm-up, then cosine or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, s: TrainerSettings) -> list[dict[str, Any]]:
    """Trainable parameters; without ``weight_decay_1d`` biases and norm scales (1-D) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if s.weight_decay_1d:
        return [{"params": params}]
    return [{"params": [p for p in params if p.dim() > 1]},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def make_optimizer(params, s: TrainerSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}; use 'sgd' or 'adamw'")


class Trainer:
    """Runs epochs of ``data`` through ``model`` under an ``accelerate.Accelerator``.

    Args:
        model: module, ``model(**batch, epoch=..., step=...)`` returns a dict with ``loss``.
        data: batches per epoch (see :class:`TrainData`); already sharded per process.
        settings: loop settings.
        accelerator: an ``accelerate.Accelerator`` (devices, DDP, mixed precision).
        output_dir: checkpoints, logs and plots go here.
        fingerprint: a dict identifying the run's configuration; a checkpoint
            with another fingerprint is refused on resume.
        step_hook: called as ``hook(step, batch, out)`` on the main process every
            ``diagnostics_every`` steps; returns extra scalars to log.
        epoch_hook: called as ``hook(epoch)`` after each epoch; returns scalars.
    """

    def __init__(self, model: nn.Module, data: TrainData, settings: TrainerSettings, accelerator,
                 output_dir: str | Path, fingerprint: dict[str, Any] | None = None,
                 step_hook: Callable[..., dict[str, float]] | None = None,
                 epoch_hook: Callable[[int], dict[str, float]] | None = None) -> None:
        self.s, self.acc, self.data = settings, accelerator, data
        self.out = Path(output_dir)
        self.fingerprint = fingerprint or {}
        self.step_hook, self.epoch_hook = step_hook, epoch_hook
        if data.steps_per_epoch < settings.grad_accum_steps:
            raise ValueError(f"an epoch has {data.steps_per_epoch} batches, fewer than "
                             f"train.grad_accum_steps={settings.grad_accum_steps}")
        self.steps_per_epoch = data.steps_per_epoch // settings.grad_accum_steps
        # Leftover batches that would not fill an optimiser step are skipped, so
        # checkpoints always fall on optimiser-step boundaries.
        self.micro_per_epoch = self.steps_per_epoch * settings.grad_accum_steps
        self.total_steps = settings.epochs * self.steps_per_epoch
        optimizer = make_optimizer(param_groups(model, settings), settings)
        warmup = int(settings.warmup_epochs * self.steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.total_steps, warmup, settings.schedule))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.epoch, self.micro_step, self.global_step = 0, 0, 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ state
    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def check_replicas(self) -> None:
        """Raise if state that must be identical on every process (the queue) differs."""
        replicated = getattr(self.unwrapped, "replicated_state", None)
        if replicated is None or self.acc.num_processes == 1:
            return
        bad = replicas_agree(replicated())
        if bad:
            raise RuntimeError(f"processes disagree on {', '.join(bad)} at step {self.global_step}")
        logger.info("replicas agree on %d tensors across %d processes", len(replicated()), self.acc.num_processes)

    def save(self) -> None:
        """Write the full training state atomically (main process only)."""
        self.check_replicas()
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return
        scaler = getattr(self.acc, "scaler", None)
        state = {
            "model": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": self.epoch, "micro_step": self.micro_step, "global_step": self.global_step,
            "rng": checkpoint.rng_state(),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "history": json.dumps(self.history),
        }
        checkpoint.save_atomic(state, self.checkpoint_path())
        logger.info("checkpoint written at step %d (epoch %d)", self.global_step, self.epoch)

    def maybe_resume(self) -> bool:
        path = self.checkpoint_path()
        if not (self.s.resume and path.is_file()):
            return False
        state = checkpoint.load(path, map_location="cpu")
        if state["fingerprint"] != json.dumps(self.fingerprint, sort_keys=True):
            raise ValueError(
                f"checkpoint {path} was written by another configuration; use a new output_dir or train.resume=false\n"
                f"  checkpoint: {state['fingerprint']}\n  this run:   {json.dumps(self.fingerprint, sort_keys=True)}")
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        self.epoch, self.micro_step, self.global_step = state["epoch"], state["micro_step"], state["global_step"]
        self.history = json.loads(state["history"])
        checkpoint.set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d (epoch %d)", path, self.global_step, self.epoch)
        return True

    # ------------------------------------------------------------------ loop
    def _log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        if self.acc.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for key, value in record.items():
                    if key not in ("step", "epoch"):
                        self._tb.add_scalar(key, value, record["step"])

    def _open_tensorboard(self):
        if not self.acc.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed (pip install 'mochi-retrieval[tensorboard]'); "
                           "scalars go to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _done(self) -> bool:
        return self.epoch >= self.s.epochs or (self.s.max_steps is not None and self.global_step >= self.s.max_steps)

    def fit(self) -> list[dict[str, float]]:
        """Train until ``epochs`` or ``max_steps``; returns the logged records."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.maybe_resume() and self.acc.is_main_process:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        self._tb = self._open_tensorboard()
        bar = tqdm(total=self.total_steps if self.s.max_steps is None else min(self.total_steps, self.s.max_steps),
                   initial=self.global_step, disable=not self.acc.is_main_process, desc="train", dynamic_ncols=True)
        window: dict[str, list[torch.Tensor]] = {}
        try:
            while not self._done():
                self._run_epoch(bar, window)
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
        return self.history

    def _run_epoch(self, bar, window: dict[str, list[torch.Tensor]]) -> None:
        self.model.train()
        start = time.perf_counter()
        for batch in self.data.epoch(self.epoch, self.micro_step):
            frac_epoch = self.epoch + self.micro_step / self.micro_per_epoch
            with self.acc.accumulate(self.model):
                out = self.model(**batch, epoch=frac_epoch, step=self.epoch * self.micro_per_epoch + self.micro_step)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()).all():
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {self.global_step} (epoch {frac_epoch:.2f}); "
                        f"the last good checkpoint is {self.checkpoint_path()}")
                self.acc.backward(loss)
                if self.s.max_grad_norm is not None and self.acc.sync_gradients:
                    self.acc.clip_grad_norm_(self.model.parameters(), self.s.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.micro_step += 1
            for key in ("loss", "accuracy"):  # tensors: no device sync until logged
                window.setdefault(key, []).append(out[key].detach())
            for key, value in out.get("monitors", {}).items():  # per-step scalars a model reports
                window.setdefault(key, []).append(value.detach().float())
            if self.micro_step % self.s.grad_accum_steps:
                continue
            self.scheduler.step()
            self.global_step += 1
            bar.update(1)
            record = self._maybe_log(batch, out, window)
            if record is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
            if self.micro_step >= self.micro_per_epoch or self._done():
                break
        if self.micro_step >= self.micro_per_epoch:
            logger.info("epoch %d took %.1f s", self.epoch, time.perf_counter() - start)
            self.epoch, self.micro_step = self.epoch + 1, 0
            if self.epoch_hook is not None and self.acc.is_main_process:
                record = {"step": self.global_step, "epoch": self.epoch, **self.epoch_hook(self.epoch)}
                self._log(record)
            if self.epoch % self.s.checkpoint_every_epochs == 0 or self._done():
                self.save()
        elif self._done():
            self.save()

    def _maybe_log(self, batch, out, window: dict[str, list[torch.Tensor]]) -> dict[str, float] | None:
        """Log the window's means (and diagnostics) at logging steps; returns the record, or None."""
        step = self.global_step
        diag = self.step_hook is not None and step % self.s.diagnostics_every == 0
        last = step >= self.total_steps or (self.s.max_steps is not None and step >= self.s.max_steps)
        if step % self.s.log_every and not diag and not last:
            return None
        record: dict[str, float] = {"step": step, "epoch": self.epoch + self.micro_step / self.micro_per_epoch,
                                    "lr": self.scheduler.get_last_lr()[0]}
        record.update({k: torch.stack(v).float().mean().item() for k, v in window.items()})
        window.clear()
        if diag and self.acc.is_main_process:
            record.update(self.step_hook(step, batch, out))
        self._log(record)
        return record
