"""Monitors of a contrastive step, as pure functions of its logits and embeddings.

- :func:`source_mass`: the mean softmax probability each negative source takes;
- :func:`family_share`: the false-negative share of each query's hard pool;
- :func:`mean_pairwise_cosine`: how spread out a batch of embeddings is (it
  rises when documents collapse together).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .negatives import NO_ID


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
