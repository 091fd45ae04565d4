"""Training-step time with freed host memory kept in the process (``train.keep_host_memory``) against glibc's
defaults, side by side.

glibc's thresholds are process-wide and set once, so each setting runs in its own process; the two alternate
(kept, default, kept, default, ...) so the host's drift hits both alike. Each process times the MoCo and the
MoCHi step of the Fashion-MNIST CPU config round-robin from the same checkpoint (as ``fashion_mnist.py
--timing-only`` does) and counts the minor page faults of each step. Reported: per process, the median step
times, their ratio and the median faults per step; then the MoCo step's speed-up (default / kept) of each
adjacent pair.

    python benchmarks/studies/host_memory.py --from runs/bench_jit08/mochi_seed0/checkpoints/step-00005616.pt
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, fashion_mnist

import torch  # noqa: E402
from common import append_results, interleaved_medians, markdown_table  # noqa: E402
from fashion_mnist import paired_steppers  # noqa: E402


def counted(step, faults: list[int]):
    def run() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return run


def worker(keep: bool, steps: int, start: Path | None) -> dict:
    steppers, _, _ = paired_steppers([f"train.keep_host_memory={str(keep).lower()}"], steps, start)
    faults: dict[str, list[int]] = {name: [] for name in steppers}
    times = interleaved_medians({name: counted(step, faults[name]) for name, step in steppers.items()}, steps,
                                torch.device("cpu"))
    return {"moco_ms": 1000 * times["moco"], "mochi_ms": 1000 * times["mochi"],
            **{f"{name}_faults": statistics.median(f[1:]) for name, f in faults.items()}}  # [1:]: not the warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="start", type=Path, default=None,
                   help="a training checkpoint both models start from (default: fresh models, random queue)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per model and process")
    p.add_argument("--pairs", type=int, default=3, help="(kept, default) process pairs")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", choices=["kept", "default"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2 or args.pairs < 1:
        p.error("--steps must be at least 2 and --pairs at least 1")
    if args.start is not None and not args.start.is_file():
        p.error(f"--from: no checkpoint at {args.start}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker == "kept", args.steps, args.start)))
        return
    command = [sys.executable, __file__, "--steps", str(args.steps)]
    command += ["--from", str(args.start)] if args.start else []
    command += ["--threads", str(args.threads)] if args.threads else []
    rows, speedups = [], []
    for pair in range(args.pairs):
        got = {}
        for setting in ("kept", "default"):
            out = subprocess.run([*command, "--worker", setting], capture_output=True, text=True, check=True)
            got[setting] = r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append([pair, setting, f"{r['moco_ms']:.1f}", f"{r['mochi_ms']:.1f}",
                         f"{r['mochi_ms'] / r['moco_ms']:.3f}x", f"{r['moco_faults']:.0f}", f"{r['mochi_faults']:.0f}"])
            print(rows[-1], flush=True)
        speedups.append(got["default"]["moco_ms"] / got["kept"]["moco_ms"])
    table = markdown_table(["pair", "host memory", "MoCo step ms", "MoCHi step ms", "MoCHi / MoCo",
                            "MoCo minor faults / step", "MoCHi minor faults / step"], rows)
    summary = (f"MoCo step, default / kept, per pair: {', '.join(f'{s:.3f}x' for s in speedups)} "
               f"(median {statistics.median(speedups):.3f}x)")
    print(table + "\n\n" + summary)
    if not args.no_write:
        append_results("fashion_mnist: step time with freed host memory kept, against glibc's defaults",
                       f"{args.pairs} process pairs, {args.steps} interleaved steps per model and process, "
                       f"{torch.get_num_threads()} torch threads"
                       f"{f', both from `{args.start}`' if args.start else ''}\n\n{table}\n\n{summary}")


if __name__ == "__main__":
    main()
