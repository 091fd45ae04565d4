"""Training-step time of config variants of the Fashion-MNIST CPU config, side by side.

Each variant is a label and dotted overrides on ``configs/fashion_mnist_resnet18.yaml``. Every variant
builds its model from the same seed and steps through the same pre-drawn batches (two augmented views:
query forward and backward, key forward, loss, optimiser step; MoCHi active from the first step), the
variants interleaved round-robin so the host's drift hits all alike; the median step time of each is
reported with its ratio to the first variant. Data loading and evaluation are not timed.

    python benchmarks/step_time.py --variant K16384 "moco.queue_size=16384" --variant K4096 "moco.queue_size=4096"
"""
from __future__ import annotations

import argparse
import shlex

import torch
from common import OneCpuProcess, append_results, interleaved_medians, markdown_table, training_step
from fashion_mnist import CONFIG

from mochi_retrieval.config import load_config
from mochi_retrieval.training import build_data, build_model


def stepper(overrides: list[str], batches: list[dict], steps_per_epoch: int):
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [*overrides, "mochi.warmup_epochs=0"])
    return training_step(build_model(cfg, steps_per_epoch, 1), cfg.train.lr, batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", nargs=2, action="append", metavar=("LABEL", "OVERRIDES"), required=True,
                   help="a label and its overrides (one shell word, space-separated; '' = the config as is)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {label: shlex.split(extra) for label, extra in args.variant}
    if len(variants) != len(args.variant):
        p.error("variant labels must be distinct")
    batch_cfgs = {label: load_config(CONFIG, extra) for label, extra in variants.items()}
    first = next(iter(batch_cfgs.values()))
    for label, cfg in batch_cfgs.items():  # one set of batches serves all: the data settings must agree
        if (cfg.data, cfg.train.batch_size) != (first.data, first.train.batch_size):
            p.error(f"variant {label!r} changes the data or the batch size; time those separately")
    data = build_data(first, OneCpuProcess())
    batches = [b for _, b in zip(range(min(args.steps, 20)), data.epoch(0))]
    fns = {label: stepper(extra, batches, data.steps_per_epoch) for label, extra in variants.items()}
    times = interleaved_medians(fns, args.steps, torch.device("cpu"))
    base = next(iter(times.values()))
    rows = [[label, f"`{' '.join(variants[label])}`" if variants[label] else "(config)", f"{1000 * t:.1f}",
             f"{t / base:.3f}x"] for label, t in times.items()]
    table = markdown_table(["variant", "overrides", "median step ms", "vs first"], rows)
    print(table)
    if not args.no_write:
        append_results("fashion_mnist: step time of config variants, side by side",
                       f"{args.steps} interleaved steps each, {torch.get_num_threads()} torch threads, fresh "
                       f"models (seed 0), MoCHi active from the first step\n\n{table}")


if __name__ == "__main__":
    main()
