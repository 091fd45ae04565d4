"""Training program: ``python -m mochi_retrieval.train CONFIG.yaml [dotted.key=value ...]``.

The same arguments work under ``accelerate launch -m mochi_retrieval.train``.
This file is the command line; the program is the package :mod:`mochi_retrieval.training`
(:func:`~mochi_retrieval.training.runner.run`, the loop, checkpoints, one recipe per modality).
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
import logging
import sys
from typing import Sequence

from .config import ConfigError, ExperimentConfig, load_config

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
    from .data.fashion_mnist import FashionMNISTNotFoundError
    from .training import run
    from .training.checkpoints import CheckpointError
    from .training.loop import EXIT_INTERRUPTED, CollectiveFailure, TrainingDiverged, TrainingInterrupted

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


if __name__ == "__main__":
    from .distributed import exit_launched_process

    exit_launched_process(main())
