"""MoCo-v2 augmentations ("aug+").

Two implementations of one recipe:

- :func:`mocov2_transform`: per-image torchvision transforms, for ImageFolder
  data decoded in DataLoader workers (ImageNet).
- :class:`BatchAugment`: the same recipe applied to a whole (B, C, H, W) batch
  at once with ``affine_grid``/``grid_sample``, for small in-memory image sets
  (Fashion-MNIST). It runs on the batch's device, draws from an explicit
  generator (so a resumed run repeats the same crops), and keeps data loading
  far from being the bottleneck on a CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_STATS = (IMAGENET_MEAN, IMAGENET_STD)


def mocov2_transform(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     scale: tuple[float, float] = (0.2, 1.0), jitter: float = 0.4, p_blur: float = 0.5):
    """aug+ of MoCo-v2: crop ``scale`` (0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grey p=0.2,
    blur p=0.5, flip. ``jitter`` scales the colour jitter (hue ``jitter / 4``)."""
    from torchvision import transforms as T

    blur_kernel = 2 * (int(0.1 * image_size) // 2) + 1  # ~10% of the side, odd
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=tuple(scale)),
        T.RandomApply([T.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=p_blur),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class TwoCrops:
    """Two independent views of one image: the MoCo query and key (then ``extra`` more: support views)."""

    def __init__(self, transform, extra: int = 0) -> None:
        self.transform, self.extra = transform, extra

    def __call__(self, image):
        return tuple(self.transform(image) for _ in range(2 + self.extra))


@dataclass
class BatchAugment:
    """aug+ on a batch of images: random resized crop, flip, jitter, grey, blur.

    For grey images the colour steps reduce to brightness and contrast.

    Args:
        out_size: side of the output crops.
        scale: crop area range (as a share of the image).
        ratio: crop aspect ratio range.
        jitter: brightness/contrast/saturation strength (MoCo-v2: 0.4).
        p_jitter, p_gray, p_blur: probabilities of those steps.
        mean, std: per-channel normalisation after augmentation.
    """

    out_size: int = 28
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.4
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.5
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) uint8 or float in [0, 1] -> (B, C, out, out) normalised float."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        b, c = x.shape[:2]
        rand = lambda *shape: torch.rand(*shape, device=x.device, generator=generator)  # noqa: E731
        x = self._crop_flip(x, rand)
        x = self._jitter(x, rand)
        if c == 3:
            gray = x.mul(torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = torch.where(rand(b, 1, 1, 1) < self.p_gray, gray.expand_as(x), x)
        x = self._blur(x, rand)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x.clamp(0, 1) - mean) / std

    def _crop_flip(self, x: torch.Tensor, rand) -> torch.Tensor:
        b = x.shape[0]
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * rand(b)
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * rand(b)
        aspect = torch.exp(log_r)
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width, share of the image
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - w) * (2 * rand(b) - 1)  # centre in [-1+w, 1-w] (grid coordinates)
        cy = (1 - h) * (2 * rand(b) - 1)
        flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [b, x.shape[1], self.out_size, self.out_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter(self, x: torch.Tensor, rand) -> torch.Tensor:
        b = x.shape[0]
        on = (rand(b, 1, 1, 1) < self.p_jitter).float()
        factor = lambda: 1 + on * self.jitter * (2 * rand(b, 1, 1, 1) - 1)  # noqa: E731
        x = x * factor()  # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor() + mean  # contrast
        if x.shape[1] == 3:
            gray = x.mean(dim=1, keepdim=True)
            x = (x - gray) * factor() + gray  # saturation
        return x.clamp(0, 1)

    def _blur(self, x: torch.Tensor, rand) -> torch.Tensor:
        b, c, size = x.shape[0], x.shape[1], x.shape[-1]
        radius = max(1, int(0.1 * size) // 2)
        sigma = (0.1 + 1.9 * rand(b)).view(b, 1)
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
        kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 2r+1), one kernel per image
        on = rand(b) < self.p_blur
        weight = kernel.repeat_interleave(c, 0)  # (B*C, 2r+1)
        flat = x.reshape(1, b * c, size, size)
        pad = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
        out = F.conv2d(pad, weight.view(b * c, 1, 1, -1), groups=b * c)
        out = F.conv2d(out, weight.view(b * c, 1, -1, 1), groups=b * c).view_as(x)
        return torch.where(on.view(b, 1, 1, 1), out, x)
