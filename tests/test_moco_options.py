"""MoCo image options, each checked against a reference written out: shuffle BN in one process (``bn_splits``:
BatchNorm statistics per sub-batch, the key batch shuffled before the split), the symmetric loss, and the
positive-aware ceiling (``max_neg_pos_ratio``) on image negatives."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mochi_retrieval.config import ConfigError, ExperimentConfig
from mochi_retrieval.config.engine import from_dict
from mochi_retrieval.encoders.split_bn import convert_split_batchnorm
from mochi_retrieval.moco import MoCo


class BNEncoder(nn.Module):
    """A conv + BatchNorm backbone: its outputs depend on the batch it is normalised with."""

    output_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())

    def forward(self, x):
        return self.net(x)


def make(splits: int, shuffle: bool = True) -> MoCo:
    torch.manual_seed(0)
    return MoCo(BNEncoder(), head_hidden_dim=8, head_out_dim=4, queue_size=16, bn_splits=splits, shuffle_bn=shuffle)


def plain_copy(net: nn.Module) -> nn.Module:
    """The network with BatchNorm over whatever batch it is given: the reference a pass per group uses."""
    ref = copy.deepcopy(net)
    convert_split_batchnorm(ref, 1)
    return ref


def images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def test_queries_are_normalised_per_consecutive_sub_batch():
    model, x = make(4), images(8)
    ref = plain_copy(model.query_net)
    expected = torch.cat([ref(x[i:i + 2]) for i in range(0, 8, 2)])
    assert torch.allclose(model.encode_queries(x), F.normalize(expected, dim=1), atol=1e-6)
    # One split is the plain forward, and splitting changes the outputs (BatchNorm couples a batch).
    plain = make(1)
    assert torch.allclose(plain.encode_queries(x), F.normalize(ref(x), dim=1), atol=1e-6)
    assert not torch.allclose(model.encode_queries(x), plain.encode_queries(x), atol=1e-3)


def test_keys_are_normalised_within_shuffled_groups_and_returned_in_batch_order():
    model, x = make(4), images(8)
    keys = model.encode_keys(x, step=3)
    ref = plain_copy(model.key_net)
    # The permutation is the one of (seed, step): recompute it from the same formula.
    perm = torch.randperm(8, generator=torch.Generator().manual_seed((0 * 1_000_003 + 3) * 1_009 + 7))
    groups = perm.view(4, 2)
    for group in groups:
        assert torch.allclose(keys[group], F.normalize(ref(x[group]), dim=1), atol=1e-6)
    # Not the query's groups: some key group mixes images from two consecutive query chunks.
    assert any(len({int(i) // 2 for i in group}) > 1 for group in groups)
    # Deterministic per step (a resumed run repeats it), different across steps.
    assert torch.equal(keys, model.encode_keys(x, step=3))
    assert not torch.allclose(keys, model.encode_keys(x, step=4), atol=1e-4)


def test_without_shuffle_keys_use_the_query_groups():
    model, x = make(2, shuffle=False), images(8)
    ref = plain_copy(model.key_net)
    expected = torch.cat([ref(x[:4]), ref(x[4:])])
    assert torch.allclose(model.encode_keys(x, step=0), F.normalize(expected, dim=1), atol=1e-6)


def test_a_training_step_with_splits_runs_and_writes_keys():
    model, x = make(2), images(8)
    out = model(x, x.flip(-1), ids=torch.arange(8), step=0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.query_net.encoder.net[0].weight.grad is not None
    assert torch.allclose(model.queue.keys[:8], out["k"])


def test_bad_splits_are_named():
    with pytest.raises(ValueError, match="bn_splits"):
        make(0)
    with pytest.raises(ValueError, match="bn_splits=4 needs a batch of at least 8"):
        make(4).encode_queries(images(6))
    with pytest.raises(ConfigError, match="model.bn_splits"):
        from_dict(ExperimentConfig, {"model": {"bn_splits": 3}, "train": {"batch_size": 4}})
    with pytest.raises(ConfigError, match="model.bn_splits"):
        from_dict(ExperimentConfig, {"model": {"bn_splits": 2}, "data": {"dataset": "debian"}})
    with pytest.raises(ConfigError, match="model.bn_splits.*sync_bn"):
        from_dict(ExperimentConfig, {"model": {"bn_splits": 2, "sync_bn": True}})


def test_symmetric_loss_is_the_mean_of_both_directions_written_out():
    torch.manual_seed(0)
    enc = nn.Linear(5, 6)
    enc.output_dim = 6
    model = MoCo(enc, head_hidden_dim=8, head_out_dim=4, queue_size=16, temperature=0.3, momentum=1.0,
                 symmetric=True)
    qnet, knet = copy.deepcopy(model.query_net), copy.deepcopy(model.key_net)
    queue = model.queue.keys.clone()
    x1, x2 = torch.randn(3, 5), torch.randn(3, 5)
    out = model(x1, x2, ids=torch.arange(3), step=0)
    norm = lambda t: F.normalize(t, dim=1)  # noqa: E731
    q1, q2, k1, k2 = norm(qnet(x1)), norm(qnet(x2)), norm(knet(x1)), norm(knet(x2))

    def direction(q, k):  # -log softmax of the positive among [q.k, q.queue] / T, per query
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.3
        return -logits.log_softmax(1)[:, 0]

    expected = torch.cat([direction(q1, k2), direction(q2, k1)]).mean()
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert torch.allclose(model.queue.keys[:6], torch.cat([k2, k1]), atol=1e-6)  # both keys enqueued
    assert model.queue.ids[:6].tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ConfigError, match="moco.symmetric"):
        from_dict(ExperimentConfig, {"moco": {"symmetric": True}, "data": {"dataset": "debian"}})


def test_image_ceiling_masks_negatives_scoring_above_the_positive():
    torch.manual_seed(0)
    enc = nn.Linear(5, 6)
    enc.output_dim = 6
    model = MoCo(enc, head_hidden_dim=8, head_out_dim=4, queue_size=8, temperature=0.3, momentum=1.0,
                 max_neg_pos_ratio=1.0)
    qnet, knet = copy.deepcopy(model.query_net), copy.deepcopy(model.key_net)
    x1, x2 = torch.randn(3, 5), torch.randn(3, 5)
    q, k = F.normalize(qnet(x1), dim=1), F.normalize(knet(x2), dim=1)
    model.queue.keys[0] = q[0].detach()  # a near duplicate of query 0: q.n = 1 > q.k
    queue = model.queue.keys.clone()
    out = model(x1, x2, ids=torch.arange(3), step=0)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1)
    logits[:, 1:][logits[:, 1:] > logits[:, :1]] = float("-inf")  # the ceiling, written out
    expected = -(logits / 0.3).log_softmax(1)[:, 0].mean()
    assert torch.isinf(logits[0, 1]) and torch.allclose(out["loss"], expected, atol=1e-5)
