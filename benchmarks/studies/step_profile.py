"""Where MoCHi's extra step time goes: torch.profiler self CPU time per operator, MoCHi step minus MoCo step.

Both models start from the same training checkpoint (weights and trained queue) and step through the same
real batches (MoCHi active from the first step); each is profiled over ``--steps`` steps after 3 warm-up
steps. Reports the operators whose self time per step grows most with MoCHi, and the totals. Profiles
vary from run to run by a few percent per operator (the convolutions' noise is as large as MoCHi's whole
cost), so read the operators MoCo does not run at all (top-k, gathers, draws), not the small differences.

    python benchmarks/studies/step_profile.py --from runs/bench_k4096/mochi_seed0/checkpoints/step-00005616.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, fashion_mnist

import torch  # noqa: E402
from common import append_results, markdown_table  # noqa: E402
from fashion_mnist import paired_steppers  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def self_ms_per_step(step, steps: int) -> dict[str, float]:
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / steps / 1000 for e in prof.key_averages()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="start", type=Path, required=True, help="a training checkpoint both start from")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--top", type=int, default=12, help="operators listed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if not args.start.is_file():
        p.error(f"--from: no checkpoint at {args.start}")
    if args.threads:
        torch.set_num_threads(args.threads)
    steppers, _, _ = paired_steppers([], args.steps, args.start)
    profiles = {name: self_ms_per_step(step, args.steps) for name, step in steppers.items()}
    moco, mochi = profiles["moco"], profiles["mochi"]
    growth = sorted(((mochi.get(k, 0.0) - moco.get(k, 0.0), k) for k in set(moco) | set(mochi)), reverse=True)
    rows = [[f"`{k}`", f"{moco.get(k, 0.0):.3f}", f"{mochi.get(k, 0.0):.3f}", f"{d:+.3f}"]
            for d, k in growth[:args.top]]
    rows.append(["all operators (self time)", f"{sum(moco.values()):.1f}", f"{sum(mochi.values()):.1f}",
                 f"{sum(mochi.values()) - sum(moco.values()):+.1f}"])
    table = markdown_table(["operator", "MoCo ms/step", "MoCHi ms/step", "MoCHi - MoCo"], rows)
    print(table)
    if not args.no_write:
        append_results("fashion_mnist: where MoCHi's step time goes (profiler)",
                       f"{args.steps} profiled steps per model, {torch.get_num_threads()} torch threads, both from "
                       f"`{args.start}`\n\n{table}")


if __name__ == "__main__":
    main()
