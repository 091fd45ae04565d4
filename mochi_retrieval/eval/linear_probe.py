"""Linear probe: a linear classifier trained in torch on frozen, cached features.

The features are computed once (:func:`mochi_retrieval.eval.features.extract_features`),
standardised with the training split's mean and standard deviation, and a
single ``nn.Linear`` is trained with AdamW, a cosine learning rate and
cross-entropy on the training split; top-1 is read on the test split. With no
augmentation to redo, an epoch is a pass over a (N, D) matrix, so a GPU (or
even a CPU) runs the whole probe in seconds to minutes.

Example::

    feats = extract_features(model.encode_images, train_ds, test_ds, num_classes=10)
    acc = linear_probe_top1(feats, epochs=100)
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mochi_retrieval.eval.features import Features

logger = logging.getLogger(__name__)


def train_linear_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Linear:
    """Fit ``nn.Linear(D, C)`` on standardised features.

    Args:
        features: (N, D) already standardised, on the device to train on.
        labels: (N,) int64 on the same device.
    Returns:
        The trained layer (on the features' device).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    layer = nn.Linear(features.shape[1], num_classes).to(features.device)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=g).to(features.device)
        for i in range(0, len(features), batch_size):
            j = order[i : i + batch_size]
            loss = F.cross_entropy(layer(features[j]), labels[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch == epochs - 1 or (epoch + 1) % max(1, epochs // 5) == 0:
            logger.info("linear probe epoch %d/%d: last batch loss %.4f", epoch + 1, epochs, loss.item())
    return layer


def linear_probe_top1(feats: Features, epochs: int = 100, device: str | torch.device = "cpu", **kwargs) -> float:
    """Train on ``feats.train`` and return top-1 accuracy in [0, 1] on ``feats.test``.

    ``kwargs`` go to :func:`train_linear_probe` (batch_size, lr, weight_decay, seed).
    """
    mean = feats.train.mean(0, keepdim=True)
    std = feats.train.std(0, keepdim=True).clamp(min=1e-6)
    train = ((feats.train - mean) / std).to(device)
    test = ((feats.test - mean) / std).to(device)
    layer = train_linear_probe(train, feats.train_labels.to(device), feats.num_classes, epochs, **kwargs)
    with torch.no_grad():
        pred = layer(test).argmax(1).cpu()
    acc = (pred == feats.test_labels).float().mean().item()
    logger.info("linear probe top-1: %.4f", acc)
    return acc
