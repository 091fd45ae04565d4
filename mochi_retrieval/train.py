"""Training program: ``python -m mochi_retrieval.train CONFIG.yaml [dotted.key=value ...]``.

The same arguments work under ``accelerate launch -m mochi_retrieval.train``.
Config is read here, at the edge, and turned into constructor arguments. At the
end the query encoder is exported (``encoder.pt`` + ``config.yaml``, loadable by
``python -m mochi_retrieval.eval --model OUTPUT_DIR``) and evaluated: kNN and
linear-probe accuracy on the test split, printed as a table and written to
``results.json``. Text runs (``data.dataset: text_pairs`` or ``debian``) are
evaluated with recall@k, MRR@10 and nDCG@10 on ``eval.split`` and exported as a
sentence-transformers folder, ``OUTPUT_DIR/model/``.

Exit codes: 0 done; 1 an error (its message is printed); 2 a bad config;
75 (EX_TEMPFAIL) stopped by SIGTERM or SIGUSR1 after writing a checkpoint:
run the same command again to resume.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch

from .config import ConfigError, ExperimentConfig, load_config, save_config

logger = logging.getLogger("mochi_retrieval.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mochi_retrieval.train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML experiment config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 output_dir=runs/x")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .data.fashion_mnist import FashionMNISTNotFoundError
    from .trainer import EXIT_INTERRUPTED, CollectiveFailure, TrainingDiverged, TrainingInterrupted

    try:
        results = run(cfg)
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CollectiveFailure as err:
        print(f"error: {err} (train.dist_timeout_minutes={cfg.train.dist_timeout_minutes:g})", file=sys.stderr)
        return 1
    except (FashionMNISTNotFoundError, FileNotFoundError, ValueError, TrainingDiverged, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if results:  # the main process only
        print(results_table(results, cfg))
    return 0


def results_table(results: dict[str, float], cfg: ExperimentConfig) -> str:
    rows = [(key, f"{value:.4f}" if isinstance(value, float) else str(value)) for key, value in results.items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"results of {cfg.name} ({cfg.output_dir})", "-" * (width + 12)]
    lines += [f"{k:<{width}}  {v:>9}" for k, v in rows]
    return "\n".join(lines)


def run(cfg: ExperimentConfig) -> dict[str, float]:
    """Train as configured, export the encoder, evaluate; returns the final metrics."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

    from .experiment import (build_data, build_model, fingerprint, item_labels, make_evaluator, make_step_hook,
                             settings_from)
    from .trainer import Trainer, TrainingInterrupted

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
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    if cfg.data.is_text:
        trainer, evaluator = _text_trainer(cfg, accelerator, out)
    else:
        data = build_data(cfg, accelerator)
        model = build_model(cfg, data.steps_per_epoch, accelerator.num_processes,
                            item_labels(data) if cfg.bank.enabled else None)
        evaluator = make_evaluator(cfg, accelerator.device)
        trainer = Trainer(
            model, data, settings_from(cfg), accelerator, out, fingerprint=fingerprint(cfg),
            step_hook=make_step_hook(cfg),
            epoch_hook=(lambda epoch: evaluator.knn_monitor(model.encoder, epoch)) if evaluator else None,
        )
    start = time.perf_counter()
    try:
        history = trainer.fit()
    except TrainingInterrupted:
        accelerator.end_training()  # every process stopped at the same step: the group is healthy
        raise
    train_seconds = time.perf_counter() - start
    results: dict[str, float] = {}
    if accelerator.is_main_process:
        model = trainer.unwrapped
        encoder = model.encoder
        if cfg.data.is_text:
            results = evaluator.final(encoder)
            results.update(_text_train_stats(cfg, model, trainer, train_seconds))
            from .text_experiment import export_text_model

            export_text_model(cfg, encoder, out, results)
        else:
            torch.save({"encoder": encoder.state_dict()}, out / "encoder.pt")
            results = evaluator.final(encoder)
        results["steps"] = trainer.global_step
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        from .plots import plot_history

        plot_history(history, out / "curves.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _text_trainer(cfg: ExperimentConfig, accelerator, out: Path):
    from .experiment import fingerprint, settings_from
    from .text_experiment import TextEvaluator, build_encoder, build_text_data, build_text_model, load_pairs
    from .trainer import Trainer

    pairs = load_pairs(cfg)
    encoder = build_encoder(cfg)
    data = build_text_data(cfg, accelerator, pairs, encoder)
    model = build_text_model(cfg, pairs, encoder, data.steps_per_epoch)
    trainer = Trainer(model, data, settings_from(cfg), accelerator, out, fingerprint=fingerprint(cfg))
    return trainer, TextEvaluator(cfg, accelerator.device)


def _text_train_stats(cfg: ExperimentConfig, model, trainer, seconds: float) -> dict[str, float]:
    """Training throughput and the bank's refresh cost."""
    refresh = sum(r["seconds"] for r in getattr(model, "refresh_log", []))
    pairs = trainer.global_step * cfg.train.batch_size
    stats = {"train_pairs_per_s": pairs / seconds if seconds > 0 else 0.0, "train_seconds": seconds}
    if cfg.bank.enabled:
        stats.update(bank_refreshes=len(model.refresh_log), bank_refresh_seconds=refresh)
    return stats


if __name__ == "__main__":
    sys.exit(main())
