"""Negative sources of a text step, their masks and their monitors, as pure functions.

A step's negatives come in blocks (:class:`Source`): in-batch documents, mined
documents re-encoded with gradient, queue entries, bank vectors. Every entry
carries a doc id and a group (equal groups = the same input after
tokenisation), so that

- false negatives (the query's own positives and anything that reads the same)
  are masked in every source: :func:`false_negative_mask`;
- an entry present in several sources counts once per query (the first source
  keeps it): :func:`duplicate_mask`;
- per-source softmax mass and the false-negative share of the hard pool can be
  monitored: :func:`source_mass`, :func:`family_share`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .queue import NO_ID


@dataclass
class Source:
    """One block of negatives.

    Attributes:
        name: "in_batch", "mined", "queue" or "bank".
        vectors: (M, D) shared by all queries, or (B, M, D) per query; unit rows.
        ids: (M,) or (B, M) doc ids, -1 = unknown.
        groups: like ``ids``: tokenised-input group of each entry, -1 = unknown.
        grad: whether ``vectors`` carry gradient into the document encoder.
        mask: (B, M) True = drop for that query (false negative).
    """

    name: str
    vectors: Tensor
    ids: Tensor
    groups: Tensor
    grad: bool
    mask: Tensor

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def per_query(self, values: Tensor, batch: int) -> Tensor:
        """(M,) or (B, M) entry values -> (B, M)."""
        return values if values.dim() == 2 else values.view(1, -1).expand(batch, -1)


def false_negative_mask(entry_ids: Tensor, entry_groups: Tensor, exclude: Tensor, exclude_groups: Tensor) -> Tensor:
    """(B, M) True where entry m is a false negative for query b.

    Args:
        entry_ids, entry_groups: (M,) doc id and group of each entry (-1 = unknown, never masked).
        exclude, exclude_groups: (B, E) the query's positive doc ids and their groups, -1 padded.
    """
    same_id = (entry_ids.view(1, -1, 1) == exclude.unsqueeze(1)) & (entry_ids.view(1, -1, 1) != NO_ID)
    same_group = (entry_groups.view(1, -1, 1) == exclude_groups.unsqueeze(1)) & (entry_groups.view(1, -1, 1) != NO_ID)
    return (same_id | same_group).any(dim=2)


def duplicate_mask(keys: Tensor, source: Tensor) -> Tensor:
    """(B, M) True where an earlier source holds the same entry for that query.

    Args:
        keys: (B, M) entry keys (group or id; -1 = unknown, never a duplicate).
        source: (M,) source index of each column, non-decreasing (columns are in source order).
    Within one source nothing is masked (in-batch duplicates stay as in MNRL);
    the first source that holds an entry keeps it.
    """
    b, m = keys.shape
    if m < 2:
        return torch.zeros_like(keys, dtype=torch.bool)
    order = torch.argsort(keys, dim=1, stable=True)  # equal keys stay in column (= source) order
    ranked = keys.gather(1, order)
    src = source.to(keys.device).view(1, -1).expand(b, -1).gather(1, order)
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    pos = torch.arange(m, device=keys.device).view(1, -1).expand(b, -1)
    run_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    dup_sorted = (src > src.gather(1, run_start)) & (ranked != NO_ID)
    return torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)


@torch.no_grad()
def source_mass(pos: Tensor, neg: Tensor, synthetic: Tensor | None, widths: dict[str, int],
                temperature: float) -> dict[str, Tensor]:
    """Mean softmax probability per source over ``[pos | neg | synthetic] / T``.

    Args:
        pos: (B,) q.k; neg: (B, M) q.n in source order (-inf = masked); synthetic: (B, S) or None.
        widths: source name -> its number of columns in ``neg``, in order.
    Returns:
        ``mass_positive``, ``mass_<source>`` for each source and ``mass_synthetic`` (scalars).
    """
    parts = [pos.unsqueeze(1), neg] + ([synthetic] if synthetic is not None else [])
    prob = torch.softmax(torch.cat(parts, dim=1).float() / temperature, dim=1)
    out = {"mass_positive": prob[:, 0].mean()}
    start = 1
    for name, width in widths.items():
        out[f"mass_{name}"] = prob[:, start : start + width].sum(1).mean()
        start += width
    if synthetic is not None:
        out["mass_synthetic"] = prob[:, start:].sum(1).mean()
    return out


@torch.no_grad()
def family_share(neg: Tensor, entry_family: Tensor, query_family: Tensor, pool: int) -> Tensor:
    """Share of each query's top-``pool`` unmasked negatives from its positive's family (false negatives).

    Args:
        neg: (B, M) scores, -inf = masked; entry_family: (B, M) family of each entry (-1 unknown);
        query_family: (B,) family of the query's positive.
    """
    top = torch.topk(neg, min(pool, neg.shape[1]), dim=1)
    fam = entry_family.gather(1, top.indices)
    real = torch.isfinite(top.values) & (fam != NO_ID)
    same = (fam == query_family.view(-1, 1)) & real
    return same.sum() / real.sum().clamp(min=1)


@torch.no_grad()
def mean_pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine over pairs i != j of (n, D) unit rows: (||sum x||^2 - n) / (n (n - 1))."""
    n = x.shape[0]
    if n < 2:
        return torch.zeros((), device=x.device)
    s = x.float().sum(0)
    return (s @ s - n) / (n * (n - 1))
