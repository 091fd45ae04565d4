"""One run, for any modality: accelerator, recipe, training loop, final evaluation and export."""
from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import torch

from ..config import ExperimentConfig, save_config
from .host_memory import keep_freed_host_memory
from .loop import Trainer, TrainingInterrupted
from .recipe import default_fingerprint, fingerprint, recipe_for, settings_from


def run(cfg: ExperimentConfig) -> dict[str, float]:
    """Train as configured, export the encoder, evaluate; returns the final metrics (empty off the main process)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

    # The queue and key network are buffers/frozen parameters updated identically
    # on every rank: no per-step buffer broadcast needed.
    # cpu=True on a machine without CUDA makes several processes use gloo
    # (accelerate otherwise runs them as unrelated single processes there).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                         # Bounds the wait at a collective when another process died or hangs. (accelerate
                         # passes on only values other than its 10-minute default.)
                         InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.dist_timeout_minutes))],
    )
    set_seed(cfg.seed)
    if cfg.train.keep_host_memory:
        keep_freed_host_memory()
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    recipe = recipe_for(cfg)
    data, model = recipe.build(accelerator)
    trainer = Trainer(model, data, settings_from(cfg), accelerator, out, fingerprint=fingerprint(cfg),
                      fingerprint_defaults=default_fingerprint(),
                      step_hook=recipe.step_hook(), epoch_hook=recipe.epoch_hook(model))
    start = time.perf_counter()
    try:
        history = trainer.fit()
    except TrainingInterrupted:
        accelerator.end_training()  # every process stopped at the same step: the group is healthy
        raise
    train_seconds = time.perf_counter() - start
    results: dict[str, float] = {}
    if accelerator.is_main_process:
        results = recipe.finish(trainer.unwrapped, trainer, train_seconds, out)
        results["steps"] = trainer.global_step
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        from .plots import plot_history

        plot_history(history, out / "curves.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
