"""Detection transfer: fine-tune a torchvision Faster R-CNN whose ResNet backbone
starts from our encoder, on a VOC-format folder; AP, AP50, AP75 from pycocotools.

The protocol follows MoCo / MoCHi (VOC07+12 trainval -> VOC07 test, 24k
iterations of batch 16, lr 0.02, steps at 18k and 22k, all layers trained).
One deliberate difference: torchvision ships Faster R-CNN with an FPN, not the
R50-C4 head the papers used, so numbers are comparable between our models
but not digit for digit with the papers. BatchNorm is frozen (FrozenBatchNorm2d
carrying the encoder's statistics) as in torchvision's detection recipes.

AP numbers are pycocotools' ``COCOeval`` ``stats[0:3]`` (AP at IoU .50:.95,
at .50 and at .75), as fractions in [0, 1]; difficult objects are ignored.
The full-scale settings live in ``configs/voc_detection.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from mochi_retrieval.data.augment import IMAGENET_STATS
from mochi_retrieval.data.fashion_mnist import FASHION_MNIST_STATS
from mochi_retrieval.eval.errors import EvalInputError
from mochi_retrieval.eval.features import input_channels
from mochi_retrieval.eval.voc import VOC_CLASSES, VOCDataset, coco_ground_truth, load_sets, resolve_root

logger = logging.getLogger(__name__)


@dataclass
class DetectionConfig:
    """Settings of the detection transfer (strict: unknown YAML keys are errors)."""

    train_sets: list[str] = field(default_factory=lambda: ["VOC2007/trainval", "VOC2012/trainval"])
    test_sets: list[str] = field(default_factory=lambda: ["VOC2007/test"])
    classes: Optional[list[str]] = field(default_factory=lambda: list(VOC_CLASSES))
    """Class names; null = the sorted names found in the training annotations."""
    iterations: int = 24_000
    batch_size: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    lr_steps: list[int] = field(default_factory=lambda: [18_000, 22_000])
    lr_gamma: float = 0.1
    train_min_sizes: list[int] = field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    test_min_size: int = 800
    max_size: int = 1333
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    fpn_channels: int = 256
    box_head_dim: int = 1024
    """Width of the two-layer MLP box head."""
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    trainable_layers: int = 5
    """ResNet stages fine-tuned, counted from layer4 back to conv1 (5 = all, as in MoCo)."""
    score_threshold: float = 0.05
    """Detections scoring below this are dropped before evaluation (torchvision's default)."""
    hflip: bool = True
    num_workers: int = 4
    seed: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        if not self.train_sets or not self.test_sets:
            raise ValueError("train_sets and test_sets must not be empty")
        if self.iterations < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.trainable_layers <= 5:
            raise ValueError("need iterations >= 1, batch_size >= 1, lr > 0 and 0 <= trainable_layers <= 5")
        sizes = (self.fpn_channels, self.box_head_dim, self.rpn_batch_size_per_image, self.box_batch_size_per_image)
        if min(sizes) < 1:
            raise ValueError("fpn_channels, box_head_dim and the per-image batch sizes must be >= 1")
        if len(self.anchor_sizes) != 5:
            raise ValueError("anchor_sizes needs 5 entries, one per FPN level")


def load_detection_config(path: str | Path, overrides: tuple[str, ...] = ()) -> DetectionConfig:
    """Read ``path`` strictly (unknown keys, wrong types and bad values are EvalInputError)."""
    from mochi_retrieval.config import ConfigError, load_config

    try:
        return load_config(path, overrides, cls=DetectionConfig)
    except (ConfigError, ValueError) as e:
        raise EvalInputError(f"detection config {path}: {e}") from None


def find_resnet(encoder: nn.Module) -> nn.Module:
    """The torchvision ResNet inside ``encoder``; EvalInputError when there is none."""
    from torchvision.models import ResNet

    found = next((m for m in encoder.modules() if isinstance(m, ResNet)), None)
    if found is None:
        raise EvalInputError(f"detection transfer needs a torchvision ResNet encoder, got {type(encoder).__name__}")
    return found


def _freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with the same statistics."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)
    return module


def build_detector(encoder: nn.Module, num_classes: int, cfg: DetectionConfig) -> nn.Module:
    """Faster R-CNN (FPN) whose ResNet body is a copy of ``encoder``'s ResNet.

    Args:
        num_classes: object classes, without background.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    body = _freeze_bn(copy.deepcopy(find_resnet(encoder)))
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
    if cfg.trainable_layers == 5:
        trainable.append("bn1")
    for name, p in body.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trainable))
    stage_channels = [getattr(body, f"layer{i}")[-1].conv1.in_channels for i in range(1, 5)]  # block in = stage out
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, stage_channels,
                               cfg.fpn_channels)
    mean, std = FASHION_MNIST_STATS if input_channels(body) == 1 else IMAGENET_STATS
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(backbone, min_size=tuple(cfg.train_min_sizes), max_size=cfg.max_size,
                      image_mean=list(mean), image_std=list(std), rpn_anchor_generator=anchors,
                      box_head=TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim),  # 7x7 RoIAlign output
                      box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
                      rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
                      box_batch_size_per_image=cfg.box_batch_size_per_image, box_score_thresh=cfg.score_threshold)


def _collate(batch):
    return tuple(zip(*batch))


def _lr_factor(it: int, cfg: DetectionConfig) -> float:
    warm = min(1.0, 0.001 + (1 - 0.001) * it / cfg.warmup_iters) if cfg.warmup_iters else 1.0
    return warm * cfg.lr_gamma ** sum(it >= s for s in cfg.lr_steps)


def train_detector(model: nn.Module, dataset: VOCDataset, cfg: DetectionConfig, device: torch.device,
                   progress: bool = True) -> None:
    """Iteration-based SGD with linear warm-up and step decay, horizontal flips."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=g, drop_last=False,
                        num_workers=cfg.num_workers, collate_fn=_collate, persistent_workers=cfg.num_workers > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: _lr_factor(it, cfg))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    model.train()
    for it in tqdm(range(cfg.iterations), desc="detection fine-tune", disable=not progress):
        images, targets = next(batches)
        images, targets = list(images), [dict(t) for t in targets]
        if cfg.hflip:
            for i, flip in enumerate(torch.rand(len(images), generator=g) < 0.5):
                if flip:
                    w = images[i].shape[-1]
                    images[i] = images[i].flip(-1)
                    b = targets[i]["boxes"].clone()
                    targets[i]["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"detection loss is {loss.item()} at iteration {it}: {losses}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % cfg.log_every == 0 or it == cfg.iterations - 1:
            logger.info("iter %d/%d loss %.4f (%s) lr %.5f", it + 1, cfg.iterations, loss.item(),
                        ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()), opt.param_groups[0]["lr"])


@torch.no_grad()
def predict(model: nn.Module, dataset: VOCDataset, device: torch.device, batch_size: int = 4) -> list[dict]:
    """COCO-format detections ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
    model.eval()
    out = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    for images, targets in loader:
        for det, t in zip(model([im.to(device) for im in images]), targets):
            for (x1, y1, x2, y2), label, score in zip(det["boxes"].tolist(), det["labels"].tolist(),
                                                      det["scores"].tolist()):
                out.append({"image_id": int(t["image_id"]), "category_id": int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


def evaluate_coco(ground_truth: dict, detections: list[dict]) -> dict[str, float]:
    """AP, AP50 and AP75 from pycocotools' COCOeval (``stats[0]``, ``[1]``, ``[2]``)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("detection evaluation needs pycocotools: pip install 'mochi-retrieval[detection]'") from e
    if not detections:
        logger.warning("the detector returned no boxes; AP is 0")
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # pycocotools prints; route it to the log instead
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.info("COCOeval summary:\n%s", log.getvalue().strip())
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}


def run_detection_transfer(encoder: nn.Module, data_root: str | Path, cfg: DetectionConfig,
                           device: str | torch.device = "cpu", progress: bool = True) -> dict[str, float]:
    """Fine-tune on ``cfg.train_sets`` and evaluate on ``cfg.test_sets`` under ``data_root``."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    root = resolve_root(data_root, [*cfg.train_sets, *cfg.test_sets])
    train_images, test_images = load_sets(root, cfg.train_sets), load_sets(root, cfg.test_sets)
    classes = cfg.classes or sorted({n for im in train_images for n in im.names})
    grey = input_channels(find_resnet(encoder)) == 1
    train_ds = VOCDataset(train_images, classes, train=True, grey=grey)
    test_ds = VOCDataset(test_images, classes, train=False, grey=grey)
    logger.info("detection: %d train / %d test images, %d classes", len(train_ds), len(test_ds), len(classes))
    model = build_detector(encoder, len(classes), cfg).to(device)
    train_detector(model, train_ds, cfg, device, progress)
    model.transform.min_size = (cfg.test_min_size,)
    return evaluate_coco(coco_ground_truth(test_images, classes), predict(model, test_ds, device))
