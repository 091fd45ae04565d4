"""Label-free false-negative handling for the queue: support-view detection (false negative cancellation,
Huynh et al., WACV 2022) with elimination or attraction, and the nearest-neighbour positive (NNCLR,
Dwibedi et al., ICCV 2021) as a baseline. Pure functions and one settings class; the contrastive core
(:meth:`~mochi_retrieval.core.ContrastiveCore.contrastive_step`) applies :func:`false_negative_step` as a
mask over its negatives (and, for attraction, a set of extra positives).

Detection (``eliminate``, ``attract``). For each image, S extra augmented views (the *support views*) go
through the key network, without gradient. Every negative n a query sees is scored by its similarity to
each support view z_s, aggregated over the S views: ``mean_s z_s.n`` or ``max_s z_s.n``
(:func:`support_scores`). The k best-scoring negatives of each query are flagged, optionally only those
whose aggregated score is above a threshold (:func:`flag_top_k`). Entries that other rules already mask
(the query's own image, the label oracle, ...) are never flagged.

- ``eliminate``: the flagged entries leave the negatives (and MoCHi's hard pool).
- ``attract``: the flagged entries are extra positives of a multi-positive InfoNCE
  (:func:`~mochi_retrieval.loss.multi_positive_info_nce`); they leave the negatives and MoCHi's hard pool.
- ``nearest_positive``: no support views; the queue entry nearest the query's positive key k (highest
  k.n among the unmasked entries, :func:`nearest_entry`) is flagged. ``replace`` (NNCLR) scores the query
  against that entry instead of k; ``join`` keeps k and adds the entry as a second positive (the
  multi-positive loss). Either way the entry leaves the negatives and MoCHi's hard pool.

Every option starts at ``start_epoch`` (an early queue holds near-random keys); before it the step is plain.

``oracle`` is a control for experiments, not a label-free option: the detector's flags are kept only where
the entry is the query's class, so a run measures the handling at the same ranking with precision 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import require
from .loss import negative_logits
from .mixing import Negatives, gather_negatives
from .negatives import NO_ID

Handling = Literal["none", "eliminate", "attract", "nearest_positive"]
HANDLINGS = ("none", "eliminate", "attract", "nearest_positive")
RECALL_TOP = 256  # the recall monitor's horizon: the query's top-256 negatives (by q.n)


@dataclass
class FalseNegativeConfig:
    """Label-free false-negative handling (the ``false_negatives`` section of an image config)."""

    handling: Handling = "none"
    """"none"; "eliminate" or "attract" the entries flagged by the support views (false negative
    cancellation); or "nearest_positive" (NNCLR-style: the queue entry nearest the positive key is a
    positive). See :mod:`mochi_retrieval.false_negatives`."""
    support_views: int = 2
    """S: extra augmented views per image, encoded by the key network (no gradient) to score the queue
    ("eliminate", "attract"); each costs one more key-network pass per step."""
    support_with_key: bool = False
    """Also count the positive key (the key view, already encoded: no cost) as a support view."""
    aggregate: Literal["mean", "max"] = "mean"
    """How an entry's similarities to the S support views become its score: their mean or their max."""
    top_k: int = 10
    """Entries flagged per query: the top k by aggregated score (fewer with ``threshold``)."""
    threshold: float | None = None
    """Flag only entries whose aggregated score (a cosine) is above this too; null = top k only."""
    start_epoch: float = 2.0
    """Epoch from which the handling applies (before it, plain MoCo; an early queue is near random)."""
    nearest: Literal["replace", "join"] = "replace"
    """"nearest_positive": the nearest entry replaces the positive key (NNCLR), or joins it as a second
    positive (a two-positive InfoNCE)."""
    oracle: bool = False
    """A control that needs labels (not label-free): keep only the flagged entries of the query's class, so
    the handling runs at the detector's ranking with precision 1 ("eliminate", "attract")."""

    def __post_init__(self) -> None:
        require(self.handling in HANDLINGS, "handling", " or ".join(repr(h) for h in HANDLINGS), self.handling)
        require(self.support_views >= 0, "support_views", ">= 0", self.support_views)
        require(not self.detects or self.support_views >= 1 or self.support_with_key, "support_views",
                f">= 1 for handling={self.handling!r} (or support_with_key: true)", self.support_views)
        require(self.aggregate in ("mean", "max"), "aggregate", "'mean' or 'max'", self.aggregate)
        require(self.top_k >= 1, "top_k", ">= 1", self.top_k)
        require(self.threshold is None or -1.0 <= self.threshold < 1.0, "threshold", "in [-1, 1) or null",
                self.threshold)
        require(self.start_epoch >= 0, "start_epoch", ">= 0", self.start_epoch)
        require(self.nearest in ("replace", "join"), "nearest", "'replace' or 'join'", self.nearest)
        require(not self.oracle or self.detects, "oracle", f"false with handling={self.handling!r} (it filters "
                "the support-view detector's flags)", self.oracle)

    @property
    def enabled(self) -> bool:
        return self.handling != "none"

    @property
    def detects(self) -> bool:
        """Whether the handling uses the support-view detector."""
        return self.handling in ("eliminate", "attract")

    @property
    def extra_views(self) -> int:
        """Augmented views per image the data must add to the query and key views."""
        return self.support_views if self.detects else 0

    def active(self, epoch: float) -> bool:
        return self.enabled and epoch >= self.start_epoch


@dataclass
class FalseNegativeStep:
    """One step's false-negative handling, over the step's M negatives (the blocks' columns).

    Attributes:
        flagged: (B, M) the entries the detector (or the nearest-neighbour rule) picked.
        mask: (B, M) the negatives' mask to use: the given mask with ``flagged`` added.
        positives: (B, M) entries that are extra positives (attraction, ``join``), or None.
        positive_key: (B, D) the positive to score the query against (the nearest entry under ``replace``).
        query_scores: (B, M) q.n, detached, ``-inf`` where the given mask was set (the monitors' input).
    """

    flagged: Tensor
    mask: Tensor
    positives: Tensor | None
    positive_key: Tensor
    query_scores: Tensor


@torch.no_grad()
def support_scores(support: Tensor, negatives: Negatives, aggregate: str = "mean") -> Tensor:
    """(B, M) aggregated similarity of each negative to each image's support views.

    Args:
        support: (S, B, D) unit support views (S views of each of the B images).
        negatives: (M, D), (B, M, D) or a sequence of such blocks (see :mod:`mochi_retrieval.mixing`).
        aggregate: "mean" or "max" over the S views.
    """
    if support.dim() != 3 or support.shape[0] < 1:
        raise ValueError(f"support must be (S, B, D) with S >= 1, got {tuple(support.shape)}")
    per_view = torch.stack([negative_logits(z, negatives) for z in support])  # (S, B, M)
    if aggregate == "mean":
        return per_view.mean(0)
    if aggregate == "max":
        return per_view.amax(0)
    raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")


@torch.no_grad()
def flag_top_k(scores: Tensor, excluded: Tensor, k: int, threshold: float | None = None) -> Tensor:
    """(B, M) True at each row's k highest scores among the entries not ``excluded`` (and above
    ``threshold`` when given); a row with fewer than k such entries flags all of them.

    Args:
        scores: (B, M) aggregated scores; excluded: (B, M) entries that may not be flagged.
    """
    if scores.shape != excluded.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and excluded {tuple(excluded.shape)} differ in shape")
    s = scores.masked_fill(excluded, float("-inf"))
    top = torch.topk(s, min(k, s.shape[1]), dim=1).indices
    flags = torch.zeros_like(excluded).scatter_(1, top, True) & torch.isfinite(s)
    if threshold is not None:
        flags &= s > threshold
    return flags


@torch.no_grad()
def nearest_entry(k: Tensor, negatives: Negatives, excluded: Tensor) -> Tensor:
    """(B,) column of the entry with the highest k.n among those not ``excluded`` (B, M); k: (B, D)."""
    scores = negative_logits(k, negatives, excluded)
    if not torch.isfinite(scores.amax(1)).all():
        raise ValueError("nearest_positive: some query has no unmasked negative to take as its nearest entry")
    return scores.argmax(1)


def false_negative_step(cfg: FalseNegativeConfig, q: Tensor, k: Tensor, negatives: Negatives, mask: Tensor,
                        support: Tensor | None, epoch: float,
                        same_class: Tensor | None = None) -> FalseNegativeStep | None:
    """This step's handling, or None (off, or before ``start_epoch``).

    Args:
        q, k: (B, D) unit queries and positive keys; negatives: the step's blocks (M columns).
        mask: (B, M) negatives already masked by the other rules (never flagged).
        support: (S, B, D) unit support views (may be None when only ``support_with_key`` is set, or for
            "nearest_positive").
        same_class: (B, M) whether each entry is the query's class; needed (only) by ``cfg.oracle``.
    """
    if not cfg.active(epoch):
        return None
    with torch.no_grad():
        query_scores = negative_logits(q.detach(), negatives, mask)
        k = k.detach()
        if cfg.detects:
            views = [] if support is None else [support]
            if cfg.support_with_key:
                views.append(k.unsqueeze(0))
            if not views or sum(v.shape[0] for v in views) == 0:
                raise ValueError(f"false_negatives.handling={cfg.handling!r} needs support views (view_support)")
            scores = support_scores(torch.cat(views).float(), negatives, cfg.aggregate)
            flagged = flag_top_k(scores, mask, cfg.top_k, cfg.threshold)
            if cfg.oracle:
                if same_class is None or same_class.shape != flagged.shape:
                    got = None if same_class is None else tuple(same_class.shape)
                    raise ValueError("false_negatives.oracle needs the (B, M) same-class matrix of labelled "
                                     f"queries and entries, got {got}")
                flagged = flagged & same_class
            positives = flagged if cfg.handling == "attract" else None
            return FalseNegativeStep(flagged, mask | flagged, positives, k, query_scores)
        col = nearest_entry(k, negatives, mask)
        flagged = torch.zeros_like(mask).scatter_(1, col.view(-1, 1), True)
        if cfg.nearest == "replace":
            key = gather_negatives(negatives, col.view(-1, 1)).squeeze(1).detach()
            return FalseNegativeStep(flagged, mask | flagged, None, key, query_scores)
        return FalseNegativeStep(flagged, mask | flagged, flagged, k, query_scores)


def same_class(labels: Tensor, entry_labels: Tensor) -> Tensor:
    """(B, M) whether each entry is the query's class; labels: (B,); entry_labels: (M,) or (B, M), -1 unknown
    (never the query's class)."""
    entries = entry_labels if entry_labels.dim() == 2 else entry_labels.view(1, -1).expand(labels.numel(), -1)
    return (entries == labels.view(-1, 1)) & (entries != NO_ID)


@torch.no_grad()
def detector_monitors(step: FalseNegativeStep, pos_logits: Tensor, temperature: float, labels: Tensor | None,
                      entry_labels: Tensor, top: int = RECALL_TOP) -> dict[str, Tensor]:
    """Per-step monitors of the flagged entries.

    - ``fn_flagged``: entries flagged per query;
    - ``fn_mass``: their share of the softmax over [q.k, q.n for every entry the other rules leave] / T,
      the mass they would take as negatives (mean over queries);
    - with labels, ``fn_precision``: the share of flagged entries (of known class) that are the query's class;
      ``fn_recall``: of the query's class among its ``top`` highest-scoring entries (q.n), the share flagged.

    Args:
        step: the step's handling; pos_logits: (B,) q.k; temperature: T.
        labels: (B,) query classes, or None; entry_labels: (M,) or (B, M) entry classes (-1 = unknown).
    """
    flagged, scores = step.flagged, step.query_scores
    logits = torch.cat([pos_logits.view(-1, 1), scores], dim=1).float() / temperature
    prob = logits.softmax(1)[:, 1:]
    stats = {"fn_flagged": flagged.sum(1).float().mean(), "fn_mass": (prob * flagged).sum(1).mean()}
    if labels is None:
        return stats
    entries = entry_labels if entry_labels.dim() == 2 else entry_labels.view(1, -1).expand_as(flagged)
    known = entries != NO_ID
    same = same_class(labels, entries)
    stats["fn_precision"] = (same & flagged).sum() / (flagged & known).sum().clamp(min=1)
    n = min(top, scores.shape[1])
    top_idx = torch.topk(scores, n, dim=1).indices
    in_top = torch.zeros_like(flagged).scatter_(1, top_idx, True) & torch.isfinite(scores)
    relevant = same & in_top
    stats["fn_recall"] = (relevant & flagged).sum() / relevant.sum().clamp(min=1)
    return stats


__all__ = ["FalseNegativeConfig", "FalseNegativeStep", "RECALL_TOP", "detector_monitors", "false_negative_step",
           "flag_top_k", "nearest_entry", "same_class", "support_scores"]
