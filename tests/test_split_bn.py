"""Split BatchNorm (one pass, statistics per group of the batch) against the reference it replaces: the
network run on each group in turn, with plain BatchNorm; and MoCo's steps with either."""
import copy

import pytest
import torch
from torch import nn

from mochi_retrieval.encoders.split_bn import SplitBatchNorm1d, SplitBatchNorm2d, convert_split_batchnorm
from mochi_retrieval.moco import MoCo


class Net(nn.Module):
    """Conv + BatchNorm2d, then Linear + BatchNorm1d: both kinds the conversion handles."""

    output_dim = 5

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        return self.fc(self.conv(x))


def _pair(splits: int):
    torch.manual_seed(0)
    plain = Net().double()
    split = copy.deepcopy(plain)
    assert convert_split_batchnorm(split, splits)
    return plain, split


@pytest.mark.parametrize("batch,splits", [(8, 4), (10, 4), (9, 2), (6, 1)])
def test_one_pass_equals_a_pass_per_group(batch, splits):
    plain, split = _pair(splits)
    x = torch.randn(batch, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(batch, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # the second pass starts from updated running statistics
        expected = torch.cat([plain(chunk) for chunk in torch.tensor_split(x, splits)])
        got = split(x)
        assert torch.allclose(got, expected, atol=1e-12)
        (expected * w).sum().backward()
        (got * w).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), split.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-10), name
    for (name, a), (_, b) in zip(plain.named_buffers(), split.named_buffers()):
        assert torch.allclose(a.double(), b.double(), atol=1e-12), name  # running stats, batches tracked
    assert list(plain.state_dict()) == list(split.state_dict())


def test_evaluation_mode_is_plain_batchnorm():
    plain, split = _pair(4)
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    torch.cat([plain(chunk) for chunk in torch.tensor_split(x, 4)]), split(x)  # running stats off their start
    plain.eval(), split.eval()
    assert torch.allclose(plain(x[:3]), split(x[:3]), atol=1e-12)


def test_conversion_replaces_the_classes_and_refuses_other_norms():
    _, split = _pair(3)
    kinds = {type(m) for m in split.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {SplitBatchNorm1d, SplitBatchNorm2d}
    assert convert_split_batchnorm(split, 1) and all(getattr(m, "splits", 1) == 1 for m in split.modules())
    for odd in (nn.BatchNorm3d(2), nn.BatchNorm2d(2, momentum=None), nn.BatchNorm2d(2, track_running_stats=False)):
        other = nn.Sequential(nn.BatchNorm2d(2), odd)
        assert not convert_split_batchnorm(other, 2)
        assert [type(m) for m in other] == [nn.BatchNorm2d, type(odd)]  # nothing changed
    with pytest.raises(ValueError, match="splits must be >= 1"):
        convert_split_batchnorm(Net(), 0)


def _moco(chunked: bool) -> MoCo:
    torch.manual_seed(0)
    model = MoCo(Net(), head_hidden_dim=8, head_out_dim=4, queue_size=32, bn_splits=4, momentum=0.9)
    if chunked:  # the former path: a pass per group with plain BatchNorm
        convert_split_batchnorm(model, 1)
        model._split_in_bn = False
    return model


def test_moco_steps_equal_the_pass_per_group():
    fast, slow = _moco(False), _moco(True)
    assert fast._split_in_bn and not slow._split_in_bn
    g = torch.Generator().manual_seed(3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (fast, slow)]
    for step in range(3):
        x1, x2 = torch.randn(16, 1, 6, 6, generator=g), torch.randn(16, 1, 6, 6, generator=g)
        losses = []
        for model, opt in zip((fast, slow), opts):
            out = model(x1, x2, ids=torch.arange(16) + 16 * step, step=step)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            losses.append(out["loss"].item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for (name, a), (_, b) in zip(fast.state_dict().items(), slow.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
