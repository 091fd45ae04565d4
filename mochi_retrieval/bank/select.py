"""Candidate selection: a pure function of one search round's scores, the exclusions, the ceiling and the
rank window. The bank's search calls it once per round; tests call it directly."""
from __future__ import annotations

import torch
from torch import Tensor


def select_candidates(
    scores: Tensor, rows: Tensor, k: int, *, exclude_rows: Tensor, row_groups: Tensor | None = None,
    exclude_groups: Tensor | None = None, skip_top: int = 0, ceiling: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The first k survivors of each query's ranked list.

    Args:
        scores, rows: (b, kk) one search round, best first; rows are bank row numbers (-1 = no result).
        k: candidates per query.
        exclude_rows: (b, E) rows that are positives of each query, -1 padded.
        row_groups: (N,) group of every bank row (-1 = in no group); None = no group rule.
        exclude_groups: (b, G) groups to exclude per query (those of its positives), -1 padded.
        skip_top: drop the first ``skip_top`` survivors (rank window).
        ceiling: (b,) drop survivors scoring above this (scores are sorted, so they are a prefix).
    Returns:
        left: (b,) survivors after the window; ``left >= k`` means the row's picks are exact (complete).
        picked: (b, k) rows, best first, -1 where fewer than k survived.
    """
    valid = rows >= 0
    keep = valid & ~(rows.unsqueeze(2) == exclude_rows.unsqueeze(1)).any(2)
    if row_groups is not None and exclude_groups is not None and exclude_groups.shape[1]:
        eg = exclude_groups.unsqueeze(1)  # (b, 1, G)
        g = row_groups[rows.clamp(min=0)].unsqueeze(2)  # (b, kk, 1)
        keep &= ~((g == eg) & (eg >= 0)).any(2)
    rank = keep.cumsum(1)  # 1-based rank among survivors
    start = torch.full((rows.shape[0],), skip_top, dtype=torch.long)
    if ceiling is not None:
        start = torch.maximum(start, (keep & (scores > ceiling.view(-1, 1))).sum(1))
    chosen = keep & (rank > start.unsqueeze(1)) & (rank <= (start + k).unsqueeze(1))
    picked = torch.full((rows.shape[0], k), -1, dtype=torch.long)
    r, c = chosen.nonzero(as_tuple=True)
    picked[r, (rank[r, c] - start[r] - 1)] = rows[r, c]
    return rank[:, -1] - start, picked
