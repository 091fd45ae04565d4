"""Study: how hard, and how close to the query's own positive, are the candidates a finished run's bank serves?

For each run: its last checkpoint (model and bank), ``--queries`` of its training queries and their positives
embedded by the final model, and each query's 16 bank candidates as training searched them (the query's
positives and their token groups excluded, the ``bank.max_pos_ratio`` ceiling against q.k). Reported: the
candidates' scores against the positive's, and how many are near-duplicates of the positive (cosine with
the positive document above 0.9), which a query cannot be pushed away from without being pulled off its
positive.

    python benchmarks/studies/bank_candidates.py runs/bench_text_all/ours_bank_seed0 \
        runs/bench_text_all/ours_bank_all_rolling_seed0 runs/bench_text_all/ours_bank_all_rolling_drift_seed0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common
sys.path.insert(0, str(Path(__file__).resolve().parent))  # studies/: bank_drift

import torch  # noqa: E402
from bank_drift import load_run  # noqa: E402
from common import append_results, markdown_table  # noqa: E402


@torch.no_grad()
def candidate_statistics(run: Path, queries: int, seed: int) -> list[str]:
    cfg, pairs, model, bank, step = load_run(run, "last.pt")
    model.bank.load_state_dict({k[len("bank."):]: v for k, v in bank.items()})
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(pairs), generator=g)[:queries]
    examples = [pairs[int(i)] for i in picked]
    q = model._embed([cfg.data.query_prefix + e.query for e in examples], False, "queries")  # (Q, D)
    k = model._embed([cfg.data.document_prefix + e.positive for e in examples], False, "positives")  # (Q, D)
    pos_ids = pairs.ids()[picked].view(-1, 1)  # (Q, 1)
    table = model.doc_families if cfg.bank.exclude_family else model.doc_groups
    groups = table[pos_ids.clamp(min=0)]
    pos = (q * k).sum(1)  # (Q,)
    ceiling = cfg.bank.max_pos_ratio * pos if cfg.bank.max_pos_ratio else None
    ids, vecs = model.bank.candidates(q, 16, exclude=pos_ids, exclude_groups=groups, max_similarity=ceiling,
                                      allow_fewer=True)
    valid = ids >= 0
    scores = (q.unsqueeze(1) * vecs).sum(-1)  # (Q, 16)
    to_positive = (k.unsqueeze(1) * vecs).sum(-1)  # cosine of each candidate with the query's positive
    ratio = scores / pos.unsqueeze(1)
    in_batch = (q @ k.T).masked_fill(torch.eye(len(q), dtype=torch.bool), float("-inf")).max(1).values

    def m(x: torch.Tensor) -> str:
        return f"{x.float().mean():.3f}"

    return [f"`{run.name}`", f"{len(model.bank)}", m(pos), m(scores[:, 0]), m(scores[valid]),
            m(ratio[valid] > 0.9), m(to_positive[valid] > 0.9), m(to_positive[:, 0] > 0.9), m(in_batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    rows = [candidate_statistics(run, args.queries, args.seed) for run in args.runs]
    text = "\n".join([
        f"{args.queries} training queries of each run (seed {args.seed}), embedded with its final model; its "
        "bank as saved, searched as training did (positives and their groups excluded, the max_pos_ratio "
        "ceiling); 16 candidates a query.", "",
        markdown_table(["run", "bank rows", "q.k (positive)", "top-1 candidate q.d", "mean candidate q.d",
                        "share of candidates with q.d > 0.9 q.k", "share with cos(d, positive) > 0.9",
                        "top-1 with cos(d, positive) > 0.9", "hardest in-batch q.d (reference)"], rows)])
    print(text)
    if not args.no_write:
        append_results("text_retrieval: the bank's candidates at the end of training (issue 26)", text)


if __name__ == "__main__":
    main()
