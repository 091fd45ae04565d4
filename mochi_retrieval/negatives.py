"""Negative sources: the typed blocks a step's negatives come in, and the one masking function.

Per step every source (queue, FAISS bank, in-batch documents, mined documents,
or one you add) yields a :class:`Source`: a block of negative vectors, the id
and group of each entry, whether the block carries gradient into the document
(key) encoder, and which entries are false negatives for which query. The
contrastive core (:mod:`mochi_retrieval.core`) turns a query, its positive and
these blocks into the loss.

Masking (:func:`negative_mask`), from the blocks alone:

- false negatives (the query's own positives, and any entry in their group:
  the same class for images, the same text after tokenisation for text) are
  masked in every source: :func:`false_negative_mask`;
- optionally, an entry present in several sources counts once per query (the
  first source keeps it): :func:`duplicate_mask`;
- optionally, any entry scoring above a share of the query's positive score
  (positive-aware ceiling).

A reusable source implements :class:`NegativeSource` (the queue does): it
turns a :class:`Query` into a block and takes the step's keys afterwards, so a
new source is one class in one file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .loss import negative_logits

NO_ID = -1  # id / group of an unknown entry (the queue's random initial keys, an empty bank slot)


@dataclass
class Source:
    """One block of negatives of one step.

    Attributes:
        name: what it is, e.g. "in_batch", "mined", "queue" or "bank" (monitors report per name).
        vectors: (M, D) shared by all queries, or (B, M, D) per query; unit rows.
        ids: (M,) or (B, M) ids, -1 = unknown.
        groups: like ``ids``: the group of each entry (class, or tokenised input), -1 = unknown.
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


@dataclass
class Query:
    """What a source may look at to build its block.

    Attributes:
        q: (B, D) unit queries, detached.
        exclude: (B, E) ids that are positives for each query (its own first), -1 padded.
        exclude_groups: (B, E) their groups, -1 where unknown or not to be masked.
        ids: (B,) id of each query's own positive (this process's), or None.
        k: (B, D) unit positives, detached, or None (for positive-aware rules, e.g. a ceiling of r x q.k).
    """

    q: Tensor
    exclude: Tensor
    exclude_groups: Tensor
    ids: Tensor | None = None
    k: Tensor | None = None


@runtime_checkable
class NegativeSource(Protocol):
    """A source of negatives that lives across steps (a queue, a cross-batch memory, ...)."""

    def source(self, query: Query, name: str) -> Source:
        """This step's block for ``query.q``; its mask marks each query's false negatives."""
        ...

    def add(self, keys: Tensor, ids: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Take this step's keys (n, D) with their ids and groups (n,), after the loss."""
        ...


def false_negative_mask(entry_ids: Tensor, entry_groups: Tensor, exclude: Tensor, exclude_groups: Tensor) -> Tensor:
    """(B, M) True where entry m is a false negative for query b.

    Args:
        entry_ids, entry_groups: (M,) id and group of each entry (-1 = unknown, never masked).
        exclude, exclude_groups: (B, E) the query's positive ids and their groups, -1 padded.
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


def negative_mask(q: Tensor, k: Tensor, sources: Sequence[Source], *, dedupe: bool = True,
                  max_neg_pos_ratio: float | None = None) -> Tensor:
    """(B, M) the step's mask over the concatenated blocks, in source order.

    Args:
        q, k: (B, D) unit queries and positives.
        sources: the blocks; each brings its false-negative mask.
        dedupe: also mask an entry that an earlier source holds (same group, or same id where the group is
            unknown).
        max_neg_pos_ratio: also mask every entry with q.n > r * q.k (positive-aware ceiling); None = off.
    """
    b = q.shape[0]
    mask = torch.cat([s.mask for s in sources], dim=1)
    if dedupe:
        groups = torch.cat([s.per_query(s.groups.to(mask.device), b) for s in sources], dim=1)
        entry_ids = torch.cat([s.per_query(s.ids.to(mask.device), b) for s in sources], dim=1)
        # Entries with no group fall back to their id, as -2 - id so that the two never collide.
        key = torch.where(groups >= 0, groups, torch.where(entry_ids >= 0, -2 - entry_ids, NO_ID))
        source = torch.cat([torch.full((s.width,), i) for i, s in enumerate(sources)])
        mask = mask | duplicate_mask(key, source)
    if max_neg_pos_ratio is not None:
        with torch.no_grad():
            scores = negative_logits(q, [s.vectors for s in sources])  # (B, M)
            mask = mask | (scores > max_neg_pos_ratio * (q * k).sum(1, keepdim=True))
    return mask
