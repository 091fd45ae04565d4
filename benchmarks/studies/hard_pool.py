"""MoCHi's hard-pool selection (exact top-N per query) on the CPU: ours against torch.topk and the former
version of ours, side by side on the same scores (interleaved, median).

- torch.topk(scores, N): the baseline;
- former: a 1/16 strided sample sets the threshold, candidates compacted with a two-index nonzero
  (the code before 2026-11-29, kept here as the reference);
- ours: :func:`mochi_retrieval.mixing.hard_pool`: from 32 entries per pool member a 1/32 sample and one flat
  nonzero; below that torch.topk over integer keys ordered as the floats are (no NaN-aware float compare).

All three return the same sets (checked here on every shape). Scores are q . queue for unit vectors with
a shared direction, so each row has a tail of high scores as a trained queue does.

    python benchmarks/studies/hard_pool.py [--threads 2] [--repeats 40]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, fashion_mnist

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_results, interleaved_medians, markdown_table  # noqa: E402

from mochi_retrieval.mixing import hard_pool  # noqa: E402

# (queries, queue, N): the CPU config (queue 4,096; 16,384 before), the paper's scale
SHAPES = ((128, 4096, 256), (128, 16384, 256), (256, 65536, 1024))


def former(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The selection before 2026-11-29 (stride 16, nonzero(as_tuple=True), advanced indexing)."""
    b, m = scores.shape
    sample = scores[:, ::16]
    k_sample = min(sample.shape[1], math.ceil(2.0 * n / 16))
    threshold = torch.topk(sample, k_sample, dim=1, sorted=False).values.amin(1, keepdim=True)
    rows, cols = (scores >= threshold).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=b)
    width = max(int(counts.max()), n)
    if width > m // 4:
        return torch.topk(scores, n, dim=1, sorted=False).indices
    pos = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]
    flat = rows * width + pos
    cand = scores.new_full((b * width,), float("-inf")).index_put_((flat,), scores[rows, cols])
    cand_cols = torch.zeros(b * width, dtype=torch.long).index_put_((flat,), cols)
    top = torch.topk(cand.view(b, width), n, dim=1, sorted=False).indices
    idx = cand_cols.view(b, width).gather(1, top)
    short = (counts < n).nonzero(as_tuple=True)[0]
    if short.numel():
        idx[short] = torch.topk(scores[short], n, dim=1, sorted=False).indices
    return idx


def scores_for(b: int, m: int, d: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(m, d, generator=g) + 0.5 * q.repeat(m // b, 1), dim=1)
    s = q @ queue.T
    s[:, :3] = float("-inf")  # masked entries (the query's own older keys)
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for b, m, n in SHAPES:
        s = scores_for(b, m)
        fns = {"torch.topk": lambda: torch.topk(s, n, dim=1, sorted=False).indices,
               "former": lambda: former(s, n), "ours": lambda: hard_pool(s, n)}
        sets = {name: fn().sort(1).values for name, fn in fns.items()}
        if not all(torch.equal(v, sets["torch.topk"]) for v in sets.values()):
            raise SystemExit(f"the selections differ at {(b, m, n)}")
        t = interleaved_medians(fns, args.repeats, torch.device("cpu"))
        rows.append([f"{b} x {m}, N = {n}", *(f"{1000 * t[k]:.2f}" for k in fns),
                     f"{t['former'] / t['ours']:.2f}x", f"{t['torch.topk'] / t['ours']:.2f}x"])
    body = (f"{args.threads} threads, median of {args.repeats} interleaved repeats; the three selections are equal\n\n"
            + markdown_table(["scores, pool", "torch.topk ms", "former ms", "ours ms", "former / ours",
                              "topk / ours"], rows))
    print(body)
    if not args.no_write:
        append_results("hard_pool: exact top-N selection on the CPU", body)


if __name__ == "__main__":
    main()
