"""Label-free false-negative masking by clusters of the queue's keys (pure functions).

With few classes (Fashion-MNIST: 10) about a tenth of a queue is the query's class, and those entries are
the highest-scoring negatives: masking them with the labels (``moco.mask_same_label``, an oracle) is worth
2.7 kNN points on the CPU default (benchmarks/RESULTS.md). Without labels, the keys' own clusters stand in for
the classes (as in clustering-based false-negative detection, e.g. Chen et al., ICLR 2022, "Incremental
False Negative Detection for Contrastive Learning"): spherical k-means over the queue's keys every few
steps, and each negative that falls in the cluster of the query's positive key is masked for that query.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def spherical_kmeans(x: Tensor, k: int, *, iters: int = 20, generator: torch.Generator | None = None,
                     init: Tensor | None = None) -> Tensor:
    """(k, D) unit centroids of the unit rows of ``x`` (N, D) under cosine similarity (Lloyd iterations).

    Starts from ``init`` (k, D) when given (the previous centroids: clusters move little between refreshes),
    else from k rows drawn with ``generator`` by k-means++ seeding. A cluster that loses all its points keeps its
    centroid.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= N points, got k={k} for N={x.shape[0]}")
    if iters < 1:
        raise ValueError(f"k-means iters must be >= 1, got {iters}")
    x = x.float()
    if init is not None:
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init must be ({k}, {x.shape[1]}), got shape {tuple(init.shape)}")
        c = F.normalize(init.float().to(x.device), dim=1)
    else:
        c = _kmeans_pp(x, k, generator)
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=1)  # (N,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # (k, D)
        filled = torch.bincount(assign, minlength=k).view(-1, 1) > 0
        new = torch.where(filled, F.normalize(sums, dim=1), c)
        if torch.equal(new, c):
            break
        c = new
    return c


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """(k, D) greedy k-means++ seeds (Arthur & Vassilvitskii 2007; scikit-learn's default): each step draws
    2 + ln k candidate rows with probability proportional to their squared distance to the nearest seed so
    far (2 - 2 cos for unit rows) and keeps the one that lowers the total the most."""
    n, trials = x.shape[0], 2 + int(math.log(k))
    first = int(torch.multinomial(torch.ones(n), 1, generator=generator))
    seeds = [first]
    nearest = (2 - 2 * (x @ x[first])).clamp(min=0)  # (N,) squared distance to the nearest seed
    for _ in range(k - 1):
        weights = nearest.cpu() if bool(nearest.any()) else torch.ones(n)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator).to(x.device)
        trial = torch.minimum(nearest.view(1, -1), (2 - 2 * (x[candidates] @ x.T)).clamp(min=0))  # (trials, N)
        best = int(trial.sum(dim=1).argmin())
        seeds.append(int(candidates[best]))
        nearest = trial[best]
    return x[seeds].clone()


def assign_clusters(vectors: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid (by dot product) of each row: (..., D) -> (...) long."""
    return (vectors.float() @ centroids.T.float()).argmax(dim=-1)


def same_cluster_mask(k: Tensor, blocks: list[Tensor], centroids: Tensor) -> Tensor:
    """(B, M) True where a negative shares the cluster of the query's positive key.

    Args:
        k: (B, D) the positives (keys) of the queries.
        blocks: the step's negative blocks in source order, each (M_i, D) shared or (B, M_i, D) per query.
        centroids: (C, D) cluster centres.
    """
    b = k.shape[0]
    own = assign_clusters(k, centroids).view(-1, 1)  # (B, 1)
    parts = [assign_clusters(v, centroids) for v in blocks]
    parts = [p if p.dim() == 2 else p.view(1, -1).expand(b, -1) for p in parts]
    return torch.cat(parts, dim=1) == own


__all__ = ["assign_clusters", "same_cluster_mask", "spherical_kmeans"]
