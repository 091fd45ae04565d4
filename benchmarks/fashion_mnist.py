"""MoCo-v2 vs MoCo-v2 + MoCHi on Fashion-MNIST with the CPU config, same budget and seeds.

Reports, per seed and variant: kNN (k=200, T=0.1) and linear-probe top-1 on the
test split and training images/s. Also, in the same run:

- the floor: raw-pixel kNN with the same protocol;
- training-step time of MoCHi relative to MoCo, measured side by side on the
  same batches (interleaved, median; MoCHi active);
- images/s of the data pipeline alone (two augmented views per image) against
  images/s of the training step.

    python benchmarks/fashion_mnist.py [--seeds 0 1] [--epochs 6] [train overrides ...]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import append_results, interleaved_medians, markdown_table

from mochi_retrieval import train
from mochi_retrieval.config import load_config
from mochi_retrieval.data.fashion_mnist import FASHION_MNIST_STATS, load_fashion_mnist
from mochi_retrieval.eval.knn import knn_top1
from mochi_retrieval.training import build_data, build_model

CONFIG = Path(__file__).parents[1] / "configs" / "fashion_mnist_resnet18.yaml"


def raw_pixel_knn(root: str, k: int, t: float, standardise: bool) -> float:
    """kNN on pixels in [0, 1], or standardised as the encoders see them."""
    (tr, tr_y), (te, te_y) = load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")
    mean, std = (FASHION_MNIST_STATS[0][0], FASHION_MNIST_STATS[1][0]) if standardise else (0.0, 1.0)
    flat = lambda x: ((x.float() / 255 - mean) / std).flatten(1)  # noqa: E731
    return knn_top1(flat(tr), tr_y, flat(te), te_y, k, t, 10)


class _Accel:  # the single-process fields build_data needs
    num_processes, process_index, device = 1, 0, torch.device("cpu")


def step_timing(overrides: list[str], steps: int) -> tuple[float, float, float]:
    """(MoCHi/MoCo step-time ratio, training images/s of MoCo, loader images/s), side by side."""
    cfg_on = load_config(CONFIG, overrides + ["mochi.warmup_epochs=0"])
    data = build_data(cfg_on, _Accel())
    batches = [b for _, b in zip(range(steps), data.epoch(0))]
    models = {}
    for name, enabled in (("moco", False), ("mochi", True)):
        torch.manual_seed(0)
        cfg = load_config(CONFIG, overrides + ["mochi.warmup_epochs=0", f"mochi.enabled={str(enabled).lower()}"])
        model = build_model(cfg, data.steps_per_epoch, 1)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, momentum=0.9)
        models[name] = (model, opt)
    cursor = {"moco": 0, "mochi": 0}

    def make_step(name):
        def step():
            model, opt = models[name]
            batch = batches[cursor[name] % len(batches)]
            cursor[name] += 1
            model(**batch, epoch=1.0, step=cursor[name])["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    times = interleaved_medians({n: make_step(n) for n in models}, steps, torch.device("cpu"))
    batch_size = batches[0]["view_q"].shape[0]
    it = data.epoch(1)
    loader = interleaved_medians({"loader": lambda: next(it)}, steps, torch.device("cpu"))["loader"]
    return times["mochi"] / times["moco"], batch_size / times["moco"], batch_size / loader


def timing_table(ratio: float, train_ips: float, loader_ips: float) -> str:
    return markdown_table(
        ["measured side by side", "value"],
        [["MoCHi step time / MoCo step time (median)", f"{ratio:.3f}x"],
         ["training images/s (MoCo step)", f"{train_ips:.0f}"],
         ["data pipeline images/s (two views each)", f"{loader_ips:.0f}"]])


def train_run(overrides: list[str], out: Path) -> dict[str, float]:
    start = time.perf_counter()
    code = train.main([str(CONFIG), *overrides, f"output_dir={out}", "train.resume=false"])
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}")
    wall = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    cfg = load_config(out / "config.yaml")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results["wall_s"] = wall
    results["images_per_s"] = results["steps"] * cfg.train.batch_size / wall
    losses = [r["loss"] for r in records if "loss" in r]
    results["final_loss"] = losses[-1] if losses else float("nan")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--timing-steps", type=int, default=15)
    p.add_argument("--out", default="runs/bench_fashion_mnist")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--timing-only", action="store_true", help="only the side-by-side step and loader timings")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for both variants, e.g. train.epochs=2")
    args = p.parse_args()
    cfg = load_config(CONFIG, args.overrides)

    if args.timing_only:
        ratio, train_ips, loader_ips = step_timing(args.overrides, args.timing_steps)
        side = timing_table(ratio, train_ips, loader_ips)
        print(side)
        if not args.no_write:
            append_results("fashion_mnist: step timing only", f"{args.timing_steps} interleaved steps each\n\n{side}")
        return
    floors = {name: raw_pixel_knn(cfg.data.root, cfg.eval.knn_k, cfg.eval.knn_temperature, std)
              for name, std in (("raw pixels in [0, 1] (floor)", False), ("standardised pixels (floor)", True))}
    ratio, train_ips, loader_ips = step_timing(args.overrides, args.timing_steps)
    rows = [[name, "-", f"{acc:.4f}", "-", "-", "-"] for name, acc in floors.items()]
    for seed in args.seeds:
        for name, enabled in (("MoCo-v2", "false"), ("MoCo-v2 + MoCHi", "true")):
            out = Path(args.out) / f"{name.replace(' + ', '_').replace('-', '').lower()}_seed{seed}"
            r = train_run([*args.overrides, f"seed={seed}", f"mochi.enabled={enabled}"], out)
            rows.append([name, seed, f"{r['knn_top1']:.4f}", f"{r.get('linear_top1', float('nan')):.4f}",
                         f"{r['images_per_s']:.0f}", f"{r['final_loss']:.3f}"])
    table = markdown_table(["method", "seed", "kNN top-1", "linear top-1", "train images/s (wall)", "final loss"], rows)
    side = timing_table(ratio, train_ips, loader_ips)
    budget = (f"budget: {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, {cfg.model.encoder} "
              f"{cfg.model.encoder_kwargs}, K={cfg.moco.queue_size}, MoCHi({cfg.mochi.n_hard}, {cfg.mochi.n_mix}, "
              f"{cfg.mochi.n_query_mix}) after {cfg.mochi.warmup_epochs} epochs; seeds {args.seeds}")
    print(table, "\n\n", side, sep="")
    if not args.no_write:
        append_results("fashion_mnist: MoCo-v2 vs MoCHi", f"{budget}\n\n{table}\n\n{side}")


if __name__ == "__main__":
    main()
