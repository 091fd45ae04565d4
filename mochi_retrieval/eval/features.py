"""Image classification data for the kNN and linear-probe evaluations, and the
frozen-feature cache both share.

``--data`` is either a Fashion-MNIST folder (the four idx ``.gz`` files) or
an ImageFolder root with ``train/`` and ``val/`` (or ``test/``) class folders.
Images are resized to the run's ``data.image_size`` (ImageFolder: shorter side
to 256/224 of it, then a centre crop), turned into tensors and normalised with
the statistics the trainer uses (Fashion-MNIST's own, ImageNet's for folders); grey images are
repeated to three channels when the encoder's first convolution wants three.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mochi_retrieval.data.augment import IMAGENET_STATS
from mochi_retrieval.data.fashion_mnist import FASHION_MNIST_STATS, FashionMNIST, missing_files
from mochi_retrieval.data.images import image_folder
from mochi_retrieval.eval.errors import EvalInputError

logger = logging.getLogger(__name__)



@dataclass
class Features:
    """Frozen features, computed once and shared by kNN and the linear probe.

    Attributes:
        train: (N, D) float32 features; train_labels: (N,) int64.
        test: (M, D) float32 features; test_labels: (M,) int64.
        num_classes: C.
    """

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    num_classes: int


def input_channels(encoder: nn.Module) -> int:
    """in_channels of the encoder's first 2-D convolution (3 when it has none)."""
    conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def eval_transform(image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float],
                   resize_ratio: float = 1.0):
    """Resize the shorter side to ``image_size * resize_ratio``, centre crop ``image_size``, to tensor,
    channel fix-up, normalise (ImageFolder data use the usual 256/224 ratio).

    Returns a callable PIL image -> (in_channels, image_size, image_size) float tensor.
    """
    from torchvision import transforms as T

    def channels(x: Tensor) -> Tensor:
        if x.shape[0] == in_channels:
            return x
        if x.shape[0] == 1:
            return x.expand(in_channels, -1, -1)
        if in_channels == 1:  # colour image into a grey encoder
            return x.mean(0, keepdim=True)
        raise EvalInputError(f"cannot feed {x.shape[0]}-channel images to an encoder with {in_channels} channels")

    if len(mean) != in_channels:
        mean, std = [sum(mean) / len(mean)] * in_channels, [sum(std) / len(std)] * in_channels
    return T.Compose([T.Resize(int(round(image_size * resize_ratio))), T.CenterCrop(image_size), T.ToTensor(),
                      T.Lambda(channels), T.Normalize(mean, std)])


def native_size_transform(in_channels: int, mean: Sequence[float], std: Sequence[float]):
    """What :func:`eval_transform` does to an image already at ``image_size`` (no resize, no crop), on its
    (H, W) uint8 tensor: to [0, 1], channel fix-up, normalise. No PIL image is made per item; the values are
    the PIL path's (tests/test_eval_features.py).
    """
    if len(mean) != in_channels:
        mean, std = [sum(mean) / len(mean)] * in_channels, [sum(std) / len(std)] * in_channels
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def transform(image: Tensor) -> Tensor:
        x = image.to(torch.float32).div(255).unsqueeze(0).expand(in_channels, -1, -1)
        return (x - mean_t) / std_t

    return transform


def _imagefolder_split(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def load_classification_data(root: str | Path, encoder: nn.Module, image_size: int, limit: int | None = None,
                             class_list: Sequence[str] | None = None) -> tuple[Dataset, Dataset, int]:
    """Train and test datasets of ``(image tensor, label)`` for ``root``.

    Returns:
        (train, test, num_classes).
    Raises:
        EvalInputError: ``root`` is neither layout (the message lists what is missing).
    """
    root = Path(root)
    if not root.is_dir():
        raise EvalInputError(f"data folder {root} does not exist or is not a directory")
    channels = input_channels(encoder)
    idx_missing = missing_files(root)
    if not idx_missing:
        native = image_size == 28  # the stored size: no resize or crop to do
        tf = (native_size_transform(channels, *FASHION_MNIST_STATS) if native
              else eval_transform(image_size, channels, *FASHION_MNIST_STATS))
        train, test = (FashionMNIST(root, split, tf, limit, tensor_input=native) for split in ("train", "test"))
        return train, test, 10
    train_dir = _imagefolder_split(root, ["train"])
    test_dir = _imagefolder_split(root, ["val", "test"])
    if train_dir is None or test_dir is None:
        lacking = ([] if train_dir else ["train/"]) + ([] if test_dir else ["val/ (or test/)"])
        raise EvalInputError(
            f"{root} is neither a Fashion-MNIST folder (missing {', '.join(idx_missing)}) nor an ImageFolder "
            f"root (missing {', '.join(lacking)})")
    tf = eval_transform(image_size, channels, *IMAGENET_STATS, resize_ratio=256 / 224)

    try:  # class_list keeps a subset of the class folders (ImageNet-100)
        train, test = image_folder(str(train_dir), class_list, tf), image_folder(str(test_dir), class_list, tf)
    except FileNotFoundError as e:
        raise EvalInputError(str(e)) from None
    if train.classes != test.classes:
        raise EvalInputError(f"{train_dir} and {test_dir} hold different class folders")
    n_classes = len(train.classes)
    if limit is not None:
        g = torch.Generator().manual_seed(0)  # ImageFolder sorts by class: take a random subset
        train = Subset(train, torch.randperm(len(train), generator=g)[:limit].tolist())
        test = Subset(test, torch.randperm(len(test), generator=g)[:limit].tolist())
    return train, test, n_classes


def encode_dataset(encode, dataset: Dataset, batch_size: int, desc: str, progress: bool) -> tuple[Tensor, Tensor]:
    """Run ``encode`` ((B, C, H, W) -> (B, D)) over ``dataset``. Returns (N, D) float32, (N,) int64."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        feats.append(encode(x).float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    return torch.cat(feats), torch.cat(labels)


def extract_features(encode, train: Dataset, test: Dataset, num_classes: int, batch_size: int = 256,
                     progress: bool = True) -> Features:
    """Encode both splits once (the cache the kNN and linear evaluations share)."""
    tr, tr_y = encode_dataset(encode, train, batch_size, "train features", progress)
    te, te_y = encode_dataset(encode, test, batch_size, "test features", progress)
    logger.info("features: train %s, test %s", tuple(tr.shape), tuple(te.shape))
    return Features(tr, tr_y, te, te_y, num_classes)
