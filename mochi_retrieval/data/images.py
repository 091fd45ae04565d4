"""Image data for self-supervised training: batches of two views, deterministic per epoch.

Every source splits a seeded per-epoch permutation into global batches; process
r of W takes the r-th slice of each, so a W-process run sees exactly the data of
a one-process run with the same global batch. Augmentation draws depend only on
(seed, epoch, step or index), so a run resumed mid-epoch repeats the same views.

An image file that cannot be decoded raises :class:`CorruptImageError` naming
it; with ``skip_corrupt=True`` a training folder replaces it by the next image
in the folder (batches keep their size), logs the file and counts it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import BatchAugment, TwoCrops, mocov2_transform

logger = logging.getLogger(__name__)


class CorruptImageError(ValueError):
    """An image file cannot be decoded (truncated, not an image)."""


def checked_loader(path: str):
    """torchvision's default image loader, with an error that names the file."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data ...
        raise CorruptImageError(f"image {path} cannot be decoded ({type(err).__name__}: {err})") from err


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same (n,) permutation on every process for a given (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass
class Sharding:
    """Global batch split across ``world`` processes."""

    global_batch: int
    world: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.global_batch % self.world:
            raise ValueError(f"train.batch_size={self.global_batch} is not divisible by {self.world} processes")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world

    def steps_per_epoch(self, n: int) -> int:
        steps = n // self.global_batch
        if steps == 0:
            raise ValueError(f"the data set holds {n} items, fewer than one batch (train.batch_size={self.global_batch})")
        return steps

    def local_indices(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        start = step * self.global_batch + self.rank * self.local_batch
        return perm[start : start + self.local_batch]


class InMemoryViews:
    """Two augmented views per image of an in-memory uint8 tensor set (e.g. Fashion-MNIST).

    Augmentation runs batched on ``device`` (see :class:`BatchAugment`).

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64, or None.
        sharding: global batch and process slice.
        augment: the batched aug+.
        seed: base seed.
        device: where batches and augmentation go.
        support_views: S more views per image in ``view_support`` (S, B, ...), drawn after the two views
            (which stay those of S = 0); the false-negative detector's support views.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, sharding: Sharding,
                 augment: BatchAugment, seed: int, device: torch.device | str = "cpu", support_views: int = 0) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
        self.images, self.labels = images, labels
        self.sharding, self.augment, self.seed, self.support_views = sharding, augment, seed, support_views
        self.device = torch.device(device)
        self.steps_per_epoch = sharding.steps_per_epoch(len(images))

    def __len__(self) -> int:
        return len(self.images)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``start_step .. steps_per_epoch-1`` of this epoch: view_q, view_k, ids, labels (and
        view_support)."""
        perm = epoch_permutation(len(self.images), self.seed, epoch)
        gen = torch.Generator(device=self.device)
        for step in range(start_step, self.steps_per_epoch):
            idx = self.sharding.local_indices(perm, step)
            gen.manual_seed(hash((self.seed, epoch, step, self.sharding.rank)) & 0x7FFF_FFFF_FFFF)
            x = self.images[idx].to(self.device, non_blocking=True)
            batch = {"view_q": self.augment(x, gen), "view_k": self.augment(x, gen), "ids": idx.to(self.device)}
            if self.support_views:
                batch["view_support"] = torch.stack([self.augment(x, gen) for _ in range(self.support_views)])
            if self.labels is not None:
                batch["labels"] = self.labels[idx].to(self.device)
            yield batch


class _SeededFolder(Dataset):
    """ImageFolder items whose augmentation is seeded by (sample seed) for reproducible views.

    With ``skip_corrupt`` an undecodable image is replaced by the next decodable one in
    the folder; the item then reports how many files it skipped.
    """

    def __init__(self, folder, transform, skip_corrupt: bool = False) -> None:
        self.folder, self.transform, self.skip_corrupt = folder, transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        index, image, skipped = self._load(index)
        torch.manual_seed(sample_seed)  # torchvision's random transforms draw from the global RNG
        q, k, *support = self.transform(image)
        support = torch.stack(support) if support else torch.empty(0)
        return q, k, support, index, self.folder.samples[index][1], skipped

    def _load(self, index: int):
        """(index actually loaded, image, files skipped on the way)."""
        n = len(self.folder.samples)
        for skipped in range(n):
            i = (index + skipped) % n
            try:
                return i, self.folder.loader(self.folder.samples[i][0]), skipped
            except CorruptImageError as err:
                if not self.skip_corrupt:
                    raise CorruptImageError(f"{err}; fix or remove it, or set data.skip_corrupt_images=true "
                                            "to skip such files") from err
                logger.warning("%s: skipped (data.skip_corrupt_images)", err)
        raise CorruptImageError(f"no image of {self.folder.root} can be decoded")


class _EpochBatchSampler(Sampler):
    def __init__(self, n: int, sharding: Sharding, seed: int, epoch: int, start_step: int) -> None:
        self.n, self.sharding, self.seed, self.epoch, self.start = n, sharding, seed, epoch, start_step

    def __len__(self) -> int:
        return self.sharding.steps_per_epoch(self.n) - self.start

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        for step in range(self.start, self.sharding.steps_per_epoch(self.n)):
            idx = self.sharding.local_indices(perm, step).tolist()
            yield [(i, hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF) for i in idx]


class FolderViews:
    """Two aug+ views per image of an ImageFolder tree, decoded in DataLoader workers.

    Args:
        root: the ``train`` folder of an ImageNet-style tree (one folder per class).
        sharding, seed: as for :class:`InMemoryViews`.
        image_size: crop side.
        num_workers: DataLoader worker processes.
        class_list: keep only these class folders (ImageNet-100).
        skip_corrupt: replace an undecodable image by the next one instead of stopping;
            :attr:`skipped` counts them.
        scale, jitter, p_blur: crop area range, colour-jitter strength and blur probability of
            :func:`~mochi_retrieval.data.augment.mocov2_transform`.
        support_views: S more views per image in ``view_support`` (S, B, ...), drawn after the two views.
    """

    def __init__(self, root: str, sharding: Sharding, seed: int, image_size: int = 224, num_workers: int = 8,
                 class_list: Sequence[str] | None = None, device: torch.device | str = "cpu",
                 skip_corrupt: bool = False, scale: tuple[float, float] = (0.2, 1.0), jitter: float = 0.4,
                 p_blur: float = 0.5, support_views: int = 0) -> None:
        self.folder = image_folder(root, class_list)
        transform = mocov2_transform(image_size, scale=scale, jitter=jitter, p_blur=p_blur)
        self.dataset = _SeededFolder(self.folder, TwoCrops(transform, extra=support_views), skip_corrupt)
        self.skipped = 0  # undecodable files skipped by this process so far
        self.sharding, self.seed, self.num_workers = sharding, seed, num_workers
        self.device = torch.device(device)
        self.steps_per_epoch = sharding.steps_per_epoch(len(self.dataset))

    def __len__(self) -> int:
        return len(self.dataset)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        sampler = _EpochBatchSampler(len(self.dataset), self.sharding, self.seed, epoch, start_step)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        try:
            for q, k, support, ids, labels, skipped in loader:
                self._count(int(skipped.sum()))
                batch = {"view_q": q.to(self.device, non_blocking=True),
                         "view_k": k.to(self.device, non_blocking=True),
                         "ids": ids.to(self.device), "labels": labels.to(self.device)}
                if support.dim() > 2:  # (B, S, C, H, W) -> (S, B, C, H, W)
                    batch["view_support"] = support.transpose(0, 1).to(self.device, non_blocking=True)
                yield batch
        except CorruptImageError as err:  # from a worker, its message wraps a traceback: keep the last line
            raise CorruptImageError(str(err).strip().splitlines()[-1].split("CorruptImageError: ", 1)[-1]) from err

    def _count(self, skipped: int) -> None:
        if skipped:
            self.skipped += skipped
            logger.warning("%d undecodable image file(s) skipped so far (data.skip_corrupt_images)", self.skipped)


def image_folder(root: str, class_list: Sequence[str] | None = None, transform=None):
    """torchvision ImageFolder with clear errors for a missing or empty tree; optional class subset."""
    from torchvision.datasets import ImageFolder

    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if class_list is not None:
        missing = sorted(set(class_list) - set(classes))
        if missing:
            raise FileNotFoundError(f"{root}: class folders missing for {len(missing)} listed classes, e.g. {missing[:3]}")
    if not classes:
        raise FileNotFoundError(f"image folder {root} holds no class folders (expected ROOT/CLASS/IMAGE.jpeg)")
    keep = set(class_list) if class_list is not None else None

    class _Subset(ImageFolder):
        def find_classes(self, directory):
            names = sorted(c for c in classes if keep is None or c in keep)
            return names, {c: i for i, c in enumerate(names)}

    try:
        return _Subset(root, transform=transform, loader=checked_loader)
    except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
        raise FileNotFoundError(f"image folder {root} holds no images: {err}") from err


def read_class_list(path: str) -> list[str]:
    """One class folder name per line (blank lines and # comments ignored)."""
    lines = Path(path).read_text().splitlines()
    names = [ln.split("#")[0].strip() for ln in lines]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"class list {path} is empty")
    return names
