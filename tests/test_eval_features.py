"""Fashion-MNIST at its stored size is read without a PIL image per item: the same tensors as the PIL path
(resize and centre crop to 28 are no-ops there), for grey and 3-channel encoders."""
import pytest
import torch
from torch import nn

from mochi_retrieval.data.fashion_mnist import FASHION_MNIST_STATS, FashionMNIST
from mochi_retrieval.eval.features import eval_transform, load_classification_data, native_size_transform


@pytest.mark.parametrize("channels", [1, 3])
def test_native_size_path_equals_the_pil_path(tiny_fmnist_dir, channels):
    pil = FashionMNIST(tiny_fmnist_dir, "test", eval_transform(28, channels, *FASHION_MNIST_STATS))
    fast = FashionMNIST(tiny_fmnist_dir, "test", native_size_transform(channels, *FASHION_MNIST_STATS),
                        tensor_input=True)
    assert len(pil) == len(fast) == 64
    for i in range(len(pil)):
        (a, ya), (b, yb) = pil[i], fast[i]
        assert a.shape == b.shape == (channels, 28, 28) and ya == yb
        assert torch.allclose(a, b, atol=1e-6), i


def test_loader_uses_the_native_path_only_at_the_stored_size(tiny_fmnist_dir):
    encoder = nn.Conv2d(1, 2, 3)
    train, test, n = load_classification_data(tiny_fmnist_dir, encoder, 28)
    assert n == 10 and train.tensor_input and test.tensor_input
    resized, _, _ = load_classification_data(tiny_fmnist_dir, encoder, 32, limit=8)
    assert not resized.tensor_input and resized[0][0].shape == (1, 32, 32)
