"""The image recipe: two augmented views per image, a :class:`~mochi_retrieval.moco.MoCo` model, kNN and
linear-probe evaluation on the test split, and ``encoder.pt`` as the export."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ExperimentConfig
from ..data.augment import BatchAugment
from ..data.fashion_mnist import FASHION_MNIST_STATS
from ..data.images import FolderViews, InMemoryViews, Sharding, read_class_list
from ..diagnostics import step_diagnostics
from ..encoders import create_encoder, eval_mode
from ..moco import MoCo
from .loop import Trainer
from .recipe import Recipe, local_batch

logger = logging.getLogger(__name__)



def build_data(cfg: ExperimentConfig, accelerator):
    """The training batches of two views, sharded for this process."""
    t, d = cfg.train, cfg.data
    sharding = Sharding(local_batch(cfg), accelerator.num_processes, accelerator.process_index)
    if t.batch_size > cfg.moco.queue_size:
        raise ValueError(f"train.batch_size={t.batch_size} does not fit the queue "
                         f"(moco.queue_size={cfg.moco.queue_size})")
    if d.dataset == "fashion_mnist":
        from ..data.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist(d.root, "train")
        images, labels = images[: d.limit].unsqueeze(1), labels[: d.limit]
        mean, std = FASHION_MNIST_STATS
        # Grey images have no colour to drop: the small-grey variant skips that step.
        p_gray = 0.0 if d.augmentation == "mocov2_small_grey" else 0.2
        augment = BatchAugment(out_size=d.image_size, scale=d.crop_scale, jitter=d.jitter, p_blur=d.blur_prob,
                               mean=mean, std=std, p_gray=p_gray)
        return InMemoryViews(images, labels, sharding, augment, cfg.seed, accelerator.device,
                             support_views=cfg.false_negatives.extra_views)
    classes = read_class_list(d.class_list) if d.class_list else None
    return FolderViews(f"{d.root}/train", sharding, cfg.seed, d.image_size, d.num_workers, classes,
                       accelerator.device, skip_corrupt=d.skip_corrupt_images, scale=d.crop_scale, jitter=d.jitter,
                       p_blur=d.blur_prob, support_views=cfg.false_negatives.extra_views)


def item_labels(data) -> torch.Tensor:
    """(N,) class of every training item of an image data set (-1 where unknown)."""
    if isinstance(data, FolderViews):
        return torch.tensor([label for _, label in data.folder.samples], dtype=torch.long)
    labels = getattr(data, "labels", None)
    return labels.long() if labels is not None else torch.full((len(data),), -1, dtype=torch.long)


def build_model(cfg: ExperimentConfig, batches_per_epoch: int, world: int,
                bank_labels: torch.Tensor | None = None) -> MoCo:
    """The MoCo model; ``bank_labels`` (N,) sizes the optional bank (see :func:`item_labels`)."""
    m = cfg.model
    encoder = create_encoder(m.encoder, **m.encoder_kwargs)
    model = MoCo(
        encoder, head_hidden_dim=m.head_hidden_dim, head_out_dim=m.head_out_dim, head_layers=m.head_layers,
        queue_size=cfg.moco.queue_size, momentum=cfg.moco.momentum, temperature=cfg.moco.temperature,
        mochi=cfg.mochi.settings(), mask_same_label=cfg.moco.mask_same_label, shuffle_bn=m.shuffle_bn and not m.sync_bn,
        bn_splits=m.bn_splits, symmetric=cfg.moco.symmetric, max_neg_pos_ratio=cfg.moco.max_neg_pos_ratio,
        false_negative_clusters=cfg.moco.false_negative_clusters, cluster_every=cfg.moco.cluster_every,
        cluster_start_epoch=cfg.moco.cluster_start_epoch, momentum_schedule=cfg.moco.momentum_schedule,
        total_steps=cfg.train.epochs * batches_per_epoch,
        seed=cfg.seed, bank_labels=bank_labels, bank=cfg.bank.settings(), false_negatives=cfg.false_negatives)
    if m.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world == 1 and m.shuffle_bn and not m.sync_bn and m.bn_splits == 1:
        logger.warning("model.shuffle_bn has no effect in one process with model.bn_splits=1: each query and its "
                       "positive key are normalised over the same images (BatchNorm leaks the positive); set "
                       "model.bn_splits (e.g. 4) to emulate that many GPUs")
    return model


def make_step_hook(cfg: ExperimentConfig) -> Callable[..., dict[str, float]]:
    def hook(step: int, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, float]:
        return step_diagnostics(out, out.get("query_labels", batch.get("labels")), cfg.mochi.n_hard)
    return hook


class Evaluator:
    """kNN monitor during training and the final kNN + linear-probe evaluation.

    Features come from the query backbone (no head) on un-augmented images.
    """

    def __init__(self, cfg: ExperimentConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    def _features(self, encoder: nn.Module, limit: int | None):
        from ..eval.features import extract_features, load_classification_data

        # Fashion-MNIST idx folder, or an ImageFolder root with train/ and val/.
        d = self.cfg.data
        classes = read_class_list(d.class_list) if d.class_list else None
        train, test, n_classes = load_classification_data(d.root, encoder, d.image_size, limit, classes)
        with eval_mode(encoder), torch.no_grad():
            return extract_features(lambda x: encoder(x.to(self.device)), train, test, n_classes, progress=False)

    def _knn(self, feats) -> float:
        from ..eval.knn import knn_top1

        e = self.cfg.eval
        return knn_top1(feats.train, feats.train_labels, feats.test, feats.test_labels, e.knn_k, e.knn_temperature,
                        feats.num_classes)

    def knn_monitor(self, encoder: nn.Module, epoch: int) -> dict[str, float]:
        if epoch % self.cfg.eval.knn_every_epochs:
            return {}
        return {"knn_monitor": self._knn(self._features(encoder, self.cfg.eval.knn_train_limit))}

    def final(self, encoder: nn.Module) -> dict[str, float]:
        feats = self._features(encoder, self.cfg.eval.limit)
        results = {"knn_top1": self._knn(feats)}
        if self.cfg.eval.linear_probe:
            from ..eval.linear_probe import linear_probe_top1

            results["linear_top1"] = linear_probe_top1(feats, device=self.device)
        return results


class ImageRecipe(Recipe):
    """Images: :func:`build_data`, :func:`build_model`, the kNN monitor after each epoch, and at the end
    ``encoder.pt`` then the kNN and linear-probe evaluation (:class:`Evaluator`)."""

    def build(self, accelerator) -> tuple[InMemoryViews | FolderViews, MoCo]:
        cfg = self.cfg
        data = build_data(cfg, accelerator)
        model = build_model(cfg, data.steps_per_epoch, accelerator.num_processes,
                            item_labels(data) if cfg.bank.enabled else None)
        self.evaluator = Evaluator(cfg, accelerator.device)
        return data, model

    def step_hook(self) -> Callable[..., dict[str, float]]:
        return make_step_hook(self.cfg)

    def epoch_hook(self, model: MoCo) -> Callable[[int], dict[str, float]]:
        return lambda epoch: self.evaluator.knn_monitor(model.encoder, epoch)

    def finish(self, model: MoCo, trainer: Trainer, train_seconds: float, out: Path) -> dict[str, float]:
        encoder = model.encoder
        torch.save({"encoder": encoder.state_dict()}, out / "encoder.pt")
        return self.evaluator.final(encoder)
