"""Weighted kNN classification of frozen features (Wu et al. 2018, instance discrimination).

Each test feature takes its k nearest training features by cosine similarity
s_i; neighbour i votes for its class with weight ``exp(s_i / T)``; the class
with the largest summed vote wins. k = 200 and T = 0.1 as in Wu et al. and the
MoCo / InstDisc monitoring code.

Example::

    acc = knn_top1(train_feats, train_labels, test_feats, test_labels)   # in [0, 1]
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from mochi_retrieval.search import Backend, l2_normalize, search

logger = logging.getLogger(__name__)


def knn_scores(train: Tensor, train_labels: Tensor, test: Tensor, num_classes: int, k: int = 200,
               temperature: float = 0.1, backend: Backend = "torch") -> Tensor:
    """Summed class votes.

    Args:
        train: (N, D) features (normalised here); train_labels: (N,) int64 in 0..C-1.
        test: (M, D) features.
        num_classes: C.
        k: neighbours; more than N is clamped to N with a warning.
        temperature: T in ``exp(s / T)``.
        backend: search backend (exact either way).
    Returns:
        (M, C) float32 vote totals.
    """
    if k > len(train):
        logger.warning("kNN: k=%d is larger than the %d training features; using k=%d", k, len(train), len(train))
        k = len(train)
    sims, idx = search(l2_normalize(test), l2_normalize(train), k, backend=backend)
    weights = (sims / temperature).exp()  # (M, k)
    neighbour_labels = train_labels.to(idx.device)[idx]  # (M, k)
    votes = torch.zeros(len(test), num_classes, device=weights.device)
    return votes.scatter_add_(1, neighbour_labels, weights)


def knn_top1(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, k: int = 200,
             temperature: float = 0.1, num_classes: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of the weighted kNN classifier; shapes as in :func:`knn_scores`."""
    c = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_scores(train, train_labels, test, c, k, temperature).argmax(1).cpu()
    acc = (pred == test_labels.cpu()).float().mean().item()
    logger.info("kNN (k=%d, T=%g) top-1: %.4f", k, temperature, acc)
    return acc
