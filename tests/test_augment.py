"""Augmentation settings of the data config: crop scale, blur probability, jitter strength."""
from pathlib import Path

import pytest
import torch

from mochi_retrieval.config import ConfigError, load_config
from mochi_retrieval.data.augment import BatchAugment, mocov2_transform
from mochi_retrieval.training import build_data

CONFIG = Path(__file__).parents[1] / "configs" / "fashion_mnist_resnet18.yaml"


class _Accel:
    num_processes, process_index, device = 1, 0, torch.device("cpu")


def _images(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)


def test_full_crop_without_jitter_or_blur_is_the_image_or_its_mirror():
    aug = BatchAugment(out_size=28, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0, p_blur=0.0, p_gray=0.0,
                       mean=(0.0,), std=(1.0,))
    x = _images()
    out = aug(x, torch.Generator().manual_seed(1))
    ref = x.float() / 255
    same = (out - ref).abs().flatten(1).amax(1) < 1e-5
    mirrored = (out - ref.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_larger_crop_scale_keeps_views_closer():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)  # smooth images: a small crop zooms into a different part
    x = (F.interpolate(torch.rand(256, 1, 4, 4, generator=g), size=28, mode="bilinear") * 255).to(torch.uint8)

    def view_gap(scale):
        aug = BatchAugment(out_size=28, scale=scale, jitter=0.0, p_blur=0.0, p_gray=0.0)
        g = torch.Generator().manual_seed(0)
        return (aug(x, g) - aug(x, g)).abs().mean().item()

    assert view_gap((0.8, 1.0)) < view_gap((0.2, 1.0))


def test_config_fields_reach_the_augmentation(tiny_fmnist_dir):
    cfg = load_config(CONFIG, [f"data.root={tiny_fmnist_dir}", "data.crop_scale=[0.5, 1.0]", "data.blur_prob=0.0",
                               "data.jitter=0.2", "train.batch_size=32", "moco.queue_size=64", "mochi.n_hard=16"])
    aug = build_data(cfg, _Accel()).augment
    assert (aug.scale, aug.p_blur, aug.jitter) == ((0.5, 1.0), 0.0, 0.2)


def test_folder_transform_takes_the_same_settings():
    from torchvision import transforms as T

    steps = mocov2_transform(32, scale=(0.4, 1.0), jitter=0.2, p_blur=0.1).transforms
    crop = next(t for t in steps if isinstance(t, T.RandomResizedCrop))
    blur = next(t for t in steps if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.GaussianBlur))
    jitter = next(t for t in steps if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.ColorJitter))
    assert crop.scale == (0.4, 1.0) and blur.p == 0.1 and jitter.transforms[0].brightness == (0.8, 1.2)


@pytest.mark.parametrize("override, message", [
    ("data.crop_scale=[0.0, 1.0]", "data.crop_scale"),
    ("data.crop_scale=[0.6, 0.5]", "0 < low <= high <= 1"),
    ("data.crop_scale=[0.5, 1.2]", "data.crop_scale"),
    ("data.crop_scale=[0.5]", "wrong length for 'data.crop_scale'"),
    ("data.blur_prob=1.5", "data.blur_prob"),
    ("data.jitter=-0.1", "data.jitter"),
    ("data.jitter=1.0", "data.jitter"),
])
def test_bad_augmentation_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(CONFIG, [override])
