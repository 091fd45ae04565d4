"""Training monitors from the MoCHi paper's analyses, as pure functions.

All take detached tensors and return plain floats.
"""
from __future__ import annotations

import torch

from .negatives import NO_ID


def alignment(q: torch.Tensor, k: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola alignment: E ||q - k||^alpha over positive pairs (lower is better).

    Args:
        q, k: (B, D) unit embeddings of the two views.
    """
    return (q - k).norm(dim=1).pow(alpha).mean().item()


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola uniformity: log E exp(-t ||x_i - x_j||^2) over pairs i < j (lower is better).

    Args:
        x: (B, D) unit embeddings, B >= 2.
    """
    sq = torch.pdist(x.float(), p=2).pow(2)
    return torch.logsumexp(-t * sq, dim=0).sub(torch.log(torch.tensor(float(sq.numel())))).item()


def hardness(pos_logits: torch.Tensor, neg_logits: torch.Tensor, n_hard: int) -> dict[str, float]:
    """Mean q.k, mean similarity of the hardest negative and of the top-N negatives.

    Args:
        pos_logits: (B,) un-scaled q.k.
        neg_logits: (B, K) un-scaled q.n (masked entries -inf).
        n_hard: N, the hard pool size.
    """
    n = max(1, min(n_hard, neg_logits.shape[1]))
    top = torch.topk(neg_logits, n, dim=1).values
    finite = torch.isfinite(top)
    return {
        "pos_sim": pos_logits.mean().item(),
        "hardest_neg_sim": top[:, 0][finite[:, 0]].mean().item(),
        "hard_pool_sim": top[finite].mean().item(),
    }


def false_negative_share(
    labels: torch.Tensor, entry_labels: torch.Tensor, columns: torch.Tensor
) -> float | None:
    """Share of the given queue entries whose class equals their query's.

    Entries of unknown class (label -1, e.g. the random initial queue) are left
    out. Returns None when no entry has a known class.

    Args:
        labels: (B,) query classes.
        entry_labels: (K,) classes of the queue entries, or (B, M) per query.
        columns: (B, S) entry indices per query (a hard pool, or mix sources).
    """
    picked = entry_labels.gather(1, columns) if entry_labels.dim() == 2 else entry_labels[columns]  # (B, S)
    known = picked != NO_ID
    if not known.any():
        return None
    same = (picked == labels.view(-1, 1)) & known
    return (same.sum() / known.sum()).item()


def step_diagnostics(out: dict[str, torch.Tensor], labels: torch.Tensor | None, n_hard: int) -> dict[str, float]:
    """All monitors for one :class:`~mochi_retrieval.moco.MoCo` step output."""
    stats = {"alignment": alignment(out["q"], out["k"]), "uniformity": uniformity(out["q"])}
    stats.update(hardness(out["pos_logits"], out["neg_logits"], n_hard))
    if labels is None:
        return stats
    if "hard_idx" in out:
        pool = out["hard_idx"]
    else:  # during warm-up: the pool MoCHi would use
        pool = torch.topk(out["neg_logits"], min(n_hard, out["neg_logits"].shape[1]), dim=1).indices
    shares = {"false_neg_hard_pool": false_negative_share(labels, out["queue_labels"], pool)}
    if "pair_i" in out:
        sources = torch.cat([pool.gather(1, out[name]) for name in ("pair_i", "pair_j", "query_j")], dim=1)
        shares["false_neg_synthetic_sources"] = false_negative_share(labels, out["queue_labels"], sources)
    stats.update({k: v for k, v in shares.items() if v is not None})
    return stats
