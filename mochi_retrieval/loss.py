"""Functional InfoNCE with MoCo negatives, extra negatives and MoCHi synthetic logits.

Losses take embeddings, never models or banks. The logits of one query are
``[q.k, q.n_1 ... q.n_M, q.h_1 ... q.h_S] / T`` with target 0, where the n are
the real negatives (queue entries, then any extra per-query candidates) and the
h the synthetic MoCHi points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import mixing
from .errors import require
from .mixing import MixingPlan, Negatives


@dataclass(frozen=True)
class MoCHiConfig:
    """MoCHi(N, s, s') settings.

    Attributes:
        n_hard: N, hard pool size per query.
        n_mix: s, pair mixes per query.
        n_query_mix: s', query mixes per query.
        beta_max: query weight b ~ U(0, beta_max).
        warmup_epochs: plain MoCo before this many (possibly fractional) epochs,
            since an early queue is near random.
        cap_at_positive: drop synthetic points that score above the query's
            positive (q.h > q.k). At text temperatures (about 0.05) query mixes
            b q + (1 - b) n of a near-duplicate pool can outscore the positive
            and take most of the softmax mass.
        copies_only: a control, not MoCHi: every pair point is a copy of one
            pool member (a = 1), so the pool gets the same s extra points,
            drawn the same way, without any synthesis. Against MoCHi it
            separates what mixing adds from re-weighting the hard pool.
            Query mixes (s') are left as they are.
        document_mixes: text, shared encoder, ``moco.gradient=query_only``: also mix among the negatives that
            carry gradient (in-batch and re-encoded mined documents), materialised with their gradient, in
            the document term, so a synthetic point's gradient reaches the documents it was made from (the
            query detached); the same N, s, s' and beta_max, a hard pool of those documents only.
    """

    n_hard: int = 1024
    n_mix: int = 512
    n_query_mix: int = 256
    beta_max: float = 0.5
    warmup_epochs: float = 0.0
    cap_at_positive: bool = False
    copies_only: bool = False
    document_mixes: bool = False

    def __post_init__(self) -> None:
        for name in ("n_hard", "n_mix", "n_query_mix"):
            require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        require(self.n_mix == 0 or self.n_hard >= 2, "n_hard", f">= 2 when n_mix > 0 (n_mix={self.n_mix})",
                self.n_hard)
        require(self.n_query_mix == 0 or self.n_hard >= 1, "n_hard",
                f">= 1 when n_query_mix > 0 (n_query_mix={self.n_query_mix})", self.n_hard)
        require(0.0 < self.beta_max < 1.0, "beta_max", "in (0, 1)", self.beta_max)
        require(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)
        require(not self.copies_only or self.n_mix > 0, "copies_only",
                "false when n_mix = 0 (it turns the pair mixes into copies; there are none)", self.copies_only)

    def active(self, epoch: float) -> bool:
        """Whether mixing is on at this (fractional) epoch."""
        return epoch >= self.warmup_epochs and (self.n_mix + self.n_query_mix) > 0


@dataclass
class ContrastiveOutput:
    """Result of :func:`contrastive_loss`.

    Attributes:
        loss: scalar InfoNCE loss.
        accuracy: scalar proxy-task top-1 over the real logits only.
        pos_logits: (B,) un-scaled q.k.
        neg_logits: (B, M) un-scaled q.n, masked entries -inf.
        synthetic_logits: (B, S) un-scaled q.h, or None when mixing is off.
        plan: the MoCHi draws, or None.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    pos_logits: torch.Tensor
    neg_logits: torch.Tensor
    synthetic_logits: torch.Tensor | None = None
    plan: MixingPlan | None = None


def negative_logits(q: torch.Tensor, negatives: Negatives, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D) queries x negatives -> (B, M) un-scaled scores, ``-inf`` where ``mask`` (B, M) is True."""
    blocks = [negatives] if isinstance(negatives, torch.Tensor) else list(negatives)
    parts = [q @ t.t() if t.dim() == 2 else torch.einsum("bd,bmd->bm", q, t) for t in blocks]
    logits = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if mask is not None:
        if mask.shape != logits.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
        logits = logits.masked_fill(mask, float("-inf"))
    return logits


def info_nce_from_logits(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    temperature: float,
    synthetic_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``[pos, neg, synthetic] / T`` with target 0 (float32 maths).

    Args:
        pos_logits: (B,) un-scaled positive scores.
        neg_logits: (B, M) un-scaled negative scores (``-inf`` = masked).
        temperature: T > 0.
        synthetic_logits: optional (B, S) un-scaled synthetic scores.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    parts = [pos_logits.unsqueeze(1), neg_logits]
    if synthetic_logits is not None:
        parts.append(synthetic_logits)
    # CE with target 0 = logsumexp(row) - row[0]. The row's logsumexp is taken
    # per part and then combined, so the (B, 1+M+S) logits are never concatenated.
    part_lse = torch.stack([torch.logsumexp(p.float() / temperature, dim=1) for p in parts], dim=1)
    return (torch.logsumexp(part_lse, dim=1) - pos_logits.float() / temperature).mean()


def multi_positive_info_nce(
    pos_logits: torch.Tensor,
    extra_pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    temperature: float,
    synthetic_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-positive InfoNCE (false negative attraction, Huynh et al. 2022, eq. 4; SupCon's L_out form).

    Per query with positives P = {k} + its extra positives and every logit A = P + negatives (+ synthetic):
    ``L = -1/|P| sum_{p in P} log( exp(s_p / T) / sum_{a in A} exp(s_a / T) )``, averaged over queries.
    With no extra positive it is :func:`info_nce_from_logits`.

    Args:
        pos_logits: (B,) un-scaled q.k.
        extra_pos_logits: (B, M) un-scaled scores of the extra positives, ``-inf`` where a column is not one.
        neg_logits: (B, M') un-scaled negative scores (``-inf`` = masked).
        temperature: T > 0.
        synthetic_logits: optional (B, S) un-scaled synthetic negative scores.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    parts = [pos_logits.unsqueeze(1), extra_pos_logits, neg_logits]
    if synthetic_logits is not None:
        parts.append(synthetic_logits)
    part_lse = torch.stack([torch.logsumexp(p.float() / temperature, dim=1) for p in parts], dim=1)
    denominator = torch.logsumexp(part_lse, dim=1)  # (B,)
    extra = torch.isfinite(extra_pos_logits)
    pos_sum = pos_logits.float() + extra_pos_logits.float().masked_fill(~extra, 0.0).sum(1)
    return (denominator - pos_sum / temperature / (1 + extra.sum(1))).mean()


def proxy_accuracy(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Share of queries whose positive outranks every real negative (ties go to the positive)."""
    with torch.no_grad():
        if neg_logits.shape[1] == 0:
            return torch.ones((), device=pos_logits.device)
        return (pos_logits >= neg_logits.max(dim=1).values).float().mean()


def contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    negatives: Negatives,
    temperature: float,
    *,
    mochi: MoCHiConfig | None = None,
    epoch: float = math.inf,
    neg_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    positives: torch.Tensor | None = None,
) -> ContrastiveOutput:
    """MoCo-v2 InfoNCE, with MoCHi synthetic negatives once ``mochi`` is active.

    Args:
        q: (B, D) unit queries (with gradient).
        k: (B, D) unit positive keys (normally detached).
        negatives: (M, D) shared, (B, M, D) per query, or a sequence of such
            blocks (queue first, then extra candidates); see :mod:`mixing`.
        temperature: T.
        mochi: MoCHi settings; None for plain MoCo.
        epoch: current (fractional) epoch, compared with the warm-up.
        neg_mask: (B, M) True for false negatives: dropped from the loss and
            from the hard pool.
        generator: for reproducible mixing draws.
        positives: (B, M) True for columns that are extra positives of that query (false negative
            attraction): they leave the negatives and the hard pool and the loss is
            :func:`multi_positive_info_nce`; None = one positive.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"q and k must both be (B, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    pos = (q * k).sum(dim=1)
    extra = None
    if positives is None:
        neg = negative_logits(q, negatives, neg_mask)
    else:
        scores = negative_logits(q, negatives)
        if positives.shape != scores.shape:
            raise ValueError(f"positives shape {tuple(positives.shape)} does not match logits {tuple(scores.shape)}")
        extra = scores.masked_fill(~positives, float("-inf"))
        neg = scores.masked_fill(positives if neg_mask is None else neg_mask | positives, float("-inf"))
    synthetic, plan = None, None
    if mochi is not None and mochi.active(epoch):
        plan = mixing.sample_plan(
            neg, mochi.n_hard, mochi.n_mix, mochi.n_query_mix, mochi.beta_max, generator=generator
        )
        if mochi.copies_only:  # h = normalize(1 n_i + 0 n_j) = n_i: the closed form gives s_i
            plan.alpha.fill_(1.0)
        synthetic = mixing.synthetic_logits(q, neg, negatives, plan)
        if mochi.cap_at_positive:
            synthetic = synthetic.masked_fill(synthetic > pos.detach().unsqueeze(1), float("-inf"))
    if extra is None:
        loss = info_nce_from_logits(pos, neg, temperature, synthetic)
    else:
        loss = multi_positive_info_nce(pos, extra, neg, temperature, synthetic)
    return ContrastiveOutput(loss, proxy_accuracy(pos, neg), pos, neg, synthetic, plan)


class MoCHiLoss(nn.Module):
    """Module shell over :func:`contrastive_loss`; holds T and the MoCHi settings only (T is checked by
    :func:`info_nce_from_logits`, the function that uses it)."""

    def __init__(self, temperature: float = 0.2, mochi: MoCHiConfig | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.mochi = mochi

    def forward(self, q, k, negatives, *, epoch: float = math.inf, neg_mask=None, generator=None) -> ContrastiveOutput:
        return contrastive_loss(
            q, k, negatives, self.temperature, mochi=self.mochi, epoch=epoch, neg_mask=neg_mask, generator=generator
        )

