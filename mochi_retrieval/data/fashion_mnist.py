"""Fashion-MNIST from the four gzipped idx files, with no download.

The Debian package ``dataset-fashion-mnist`` installs them under
``/usr/share/datasets/fashion-mnist/``::

    images, labels = load_fashion_mnist(split="train")   # (60000, 28, 28) uint8, (60000,) int64
    ds = FashionMNIST(split="test", transform=torchvision.transforms.ToTensor())
    x, y = ds[0]                                           # transform(PIL "L" image), int
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))  # per-channel mean and std of the training images
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MAGIC = {2049: 1, 2051: 3}  # idx magic numbers of unsigned-byte files -> number of dimensions


class FashionMNISTNotFoundError(FileNotFoundError):
    """The idx files are not where they were looked for; the message says how to install them."""


def missing_files(root: str | Path) -> list[str]:
    """Names of the four idx files that are not in ``root``."""
    return [f for pair in FILES.values() for f in pair if not (Path(root) / f).is_file()]


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes. Returns (N,) labels or (N, H, W) images, uint8."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic not in _MAGIC:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic number {magic})")
    ndim = _MAGIC[magic]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} bytes of data")
    return array.reshape(shape)


def load_fashion_mnist(
    root: str | Path = DEFAULT_ROOT, split: Literal["train", "test"] = "train"
) -> tuple[Tensor, Tensor]:
    """Load one split.

    Returns:
        images: (N, 28, 28) uint8; labels: (N,) int64 in 0..9 (see :data:`CLASSES`).
    Raises:
        FashionMNISTNotFoundError: a file is missing (the message gives the apt command).
        ValueError: unknown split, or a corrupt file.
    """
    if split not in FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    missing = missing_files(root)
    if missing:
        raise FashionMNISTNotFoundError(
            f"Fashion-MNIST not found in {root}: missing {', '.join(missing)}. "
            "Install it with `sudo apt-get install dataset-fashion-mnist` "
            f"(files go to {DEFAULT_ROOT}) or point the root at a folder holding the four idx .gz files"
        )
    img_file, lbl_file = FILES[split]
    images = read_idx(Path(root) / img_file)
    labels = read_idx(Path(root) / lbl_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST as a map-style dataset of ``(transform(image), label)``.

    Args:
        root: folder with the idx files.
        split: "train" (60k) or "test" (10k).
        transform: applied to each image, a PIL image in mode "L" (as
            torchvision's datasets give); None returns the (28, 28) uint8 tensor.
        limit: keep only the first ``limit`` items.
        tensor_input: give ``transform`` the (28, 28) uint8 tensor instead of a PIL image.
    """

    classes = CLASSES

    def __init__(self, root: str | Path = DEFAULT_ROOT, split: Literal["train", "test"] = "train",
                 transform: Callable | None = None, limit: int | None = None, tensor_input: bool = False) -> None:
        images, labels = load_fashion_mnist(root, split)
        self.images, self.labels = images[:limit], labels[:limit]
        self.transform, self.tensor_input = transform, tensor_input

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.transform is not None and self.tensor_input:
            image = self.transform(image)
        elif self.transform is not None:
            from PIL import Image

            image = self.transform(Image.fromarray(image.numpy()))  # 2-D uint8 gives mode "L"
        return image, int(self.labels[i])
