"""MoCHi's pair products c_ij = n_i . n_j on the CPU: the chunk size of the gathered rows, side by side.

:func:`mochi_retrieval.mixing._pair_products` gathers the two rows of every pair into two reused buffers of
``_GATHER_BUDGET`` elements and takes their dot products chunk by chunk. Here the CPU config's pairs
(B = 128 queries x s = 128 pair mixes over a 4,096 x 128 queue) go through budgets 2^14 to 2^18 (interleaved,
median), and the former step (2^16, ``torch.linalg.vecdot``) is timed beside them. Every variant's products
equal the direct ``(queue[i] * queue[j]).sum(1)``.

    python benchmarks/studies/pair_products.py [--threads 2] [--repeats 200]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, fashion_mnist

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_results, interleaved_medians, markdown_table  # noqa: E402

from mochi_retrieval import mixing  # noqa: E402

BUDGETS = (1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18)


def former(bank: torch.Tensor, col_i: torch.Tensor, col_j: torch.Tensor) -> torch.Tensor:
    """The step before 2026-11-29: 2^16-element chunks, ``linalg.vecdot`` into the output."""
    p, d = col_i.numel(), bank.shape[1]
    n = min(p, (1 << 16) // d)
    buf_i, buf_j, out = bank.new_empty((n, d)), bank.new_empty((n, d)), bank.new_empty(p)
    for start in range(0, p, n):
        m = min(n, p - start)
        ni = torch.index_select(bank, 0, col_i[start : start + m], out=buf_i[:m])
        nj = torch.index_select(bank, 0, col_j[start : start + m], out=buf_j[:m])
        torch.linalg.vecdot(ni, nj, out=out[start : start + m])
    return out


def ours_at(budget: int, bank: torch.Tensor, col_i: torch.Tensor, col_j: torch.Tensor):
    def run() -> torch.Tensor:
        saved, mixing._GATHER_BUDGET = mixing._GATHER_BUDGET, budget
        try:
            return mixing._shared_pair_products(bank, col_i, col_j)
        finally:
            mixing._GATHER_BUDGET = saved
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--queue", type=int, default=4096)
    p.add_argument("--pairs", type=int, default=128 * 128, help="B x s")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(args.queue, 128, generator=g), dim=1)
    col_i = torch.randint(0, args.queue, (args.pairs,), generator=g)
    col_j = torch.randint(0, args.queue, (args.pairs,), generator=g)
    fns = {"former (2^16, vecdot)": lambda: former(bank, col_i, col_j)}
    fns.update({f"ours at 2^{b.bit_length() - 1}": ours_at(b, bank, col_i, col_j) for b in BUDGETS})
    direct = (bank[col_i] * bank[col_j]).sum(1)
    for name, fn in fns.items():
        if not torch.allclose(fn(), direct, atol=1e-6):
            raise SystemExit(f"{name}: products differ from the direct ones")
    t = interleaved_medians(fns, args.repeats, torch.device("cpu"))
    base = t["former (2^16, vecdot)"]
    rows = [[name, f"{1000 * v:.3f}", f"{base / v:.2f}x"] for name, v in t.items()]
    body = (f"{args.pairs} pairs over a {args.queue} x 128 queue, {args.threads} threads, median of {args.repeats} "
            f"interleaved repeats; the library's budget is 2^{mixing._GATHER_BUDGET.bit_length() - 1}\n\n"
            + markdown_table(["variant", "ms", "former / variant"], rows))
    print(body)
    if not args.no_write:
        threads = f"{args.threads} thread" + "s" * (args.threads > 1)
        append_results(f"pair_products: chunk size of MoCHi's c_ij ({threads})", body)


if __name__ == "__main__":
    main()
