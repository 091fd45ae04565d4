"""The contrastive core both adapters share: the negative-source protocol, the one masking function, and
settings checked once (in MoCoConfig) whichever adapter is built."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mochi_retrieval.config import ConfigError
from mochi_retrieval.core import ContrastiveCore, MoCoConfig
from mochi_retrieval.moco import MoCo
from mochi_retrieval.negatives import NO_ID, NegativeSource, Query, Source, negative_mask
from mochi_retrieval.queue import MomentumQueue
from mochi_retrieval.text_model import TextMoCo


class TinyEncoder(nn.Module):
    output_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return self.lin(x)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_queue_is_a_negative_source_whose_block_masks_like_exclusion_mask():
    q = MomentumQueue(6, 4)
    q.add(unit(4, 4), ids=torch.tensor([5, 6, 7, 8]), labels=torch.tensor([0, 1, 0, 2]))
    assert isinstance(q, NegativeSource)
    ids, labels = torch.tensor([6, 9]), torch.tensor([0, 2])
    block = q.source(Query(unit(2, 4), ids.view(-1, 1), labels.view(-1, 1)))
    assert torch.equal(block.mask, q.exclusion_mask(ids=ids, labels=labels))
    assert torch.equal(block.vectors, q.keys) and block.vectors.data_ptr() != q.keys.data_ptr()  # a copy
    assert not block.grad and block.width == 6


def test_negative_mask_dedupes_across_sources_only_when_asked():
    b = 2
    first = Source("a", unit(3, 4, seed=1), torch.tensor([1, 2, 3]), torch.tensor([10, 20, NO_ID]), True,
                   torch.zeros(b, 3, dtype=torch.bool))
    second = Source("b", unit(2, 4, seed=2), torch.tensor([4, 5]), torch.tensor([20, NO_ID]), False,
                    torch.tensor([[False, True], [False, False]]))
    q = k = unit(b, 4, seed=3)
    plain = negative_mask(q, k, [first, second], dedupe=False)
    assert plain.tolist() == [[False, False, False, False, True], [False, False, False, False, False]]
    deduped = negative_mask(q, k, [first, second])
    assert deduped.tolist() == [[False, False, False, True, True], [False, False, False, True, False]]


@pytest.mark.parametrize("build", [
    lambda **kw: MoCo(TinyEncoder(), head_hidden_dim=8, head_out_dim=4, queue_size=8, **kw),
    lambda **kw: TextMoCo(TinyEncoder(), torch.arange(4), queue_size=8, **kw),
])
def test_both_adapters_are_the_core_and_share_its_checks(build):
    assert isinstance(build(), ContrastiveCore)
    for kwargs, key in [({"temperature": 0.0}, "'temperature'"), ({"momentum": 1.5}, "'momentum'"),
                        ({"momentum_schedule": "linear"}, "'momentum_schedule'")]:
        with pytest.raises(ConfigError, match=key):
            build(**kwargs)
    with pytest.raises(ValueError, match="total_steps"):
        build(momentum_schedule="cosine")


def test_moco_config_is_the_config_section():
    from mochi_retrieval.config import ExperimentConfig

    assert type(ExperimentConfig().moco) is MoCoConfig
    with pytest.raises(ConfigError, match="invalid value for 'gradient'"):
        MoCoConfig(gradient="both")


class GivenNegatives:
    """A persistent source written outside the core: fixed vectors (no module), recording the keys it gets."""

    def __init__(self, vectors):
        self.vectors, self.received = vectors, []

    def source(self, query, name):
        b, m = query.q.shape[0], self.vectors.shape[0]
        ids = torch.arange(100, 100 + m)
        return Source(name, self.vectors, ids, torch.full((m,), NO_ID), False, torch.zeros(b, m, dtype=torch.bool))

    def add(self, keys, ids=None, labels=None):
        self.received.append((keys.clone(), ids))


def test_a_registered_source_joins_every_step_after_the_queue_and_takes_the_keys():
    torch.manual_seed(0)
    model = MoCo(TinyEncoder(), head_hidden_dim=8, head_out_dim=4, queue_size=8, temperature=0.5)
    given = GivenNegatives(unit(5, 4, seed=4))
    model.add_negative_source("given", given)
    x, ids = torch.randn(6, 3), torch.arange(6)
    out = model(x, x + 0.01, ids=ids, step=0)
    assert out["neg_logits"].shape == (6, 8 + 5)  # queue block first, then the registered one
    assert torch.allclose(out["neg_logits"][:, 8:], out["q"] @ given.vectors.T, atol=1e-6)  # cosines
    (keys, got_ids), = given.received
    assert torch.equal(keys, out["k"]) and torch.equal(got_ids, ids)
    # A module source's buffers join the model's state and the cross-process check, under its name.
    memory = MomentumQueue(4, 4)
    model.add_negative_source("memory", memory)
    assert "memory.keys" in model.state_dict() and "memory.keys" in model.replicated_state()
    model(x, x, ids=ids, step=1)
    assert memory.ids.sort().values.tolist() == [2, 3, 4, 5]  # a 4-slot ring keeps the batch's last 4 keys


def test_registering_a_source_checks_the_protocol_and_the_name():
    model = MoCo(TinyEncoder(), head_hidden_dim=8, head_out_dim=4, queue_size=8)
    with pytest.raises(TypeError, match="does not implement NegativeSource"):
        model.add_negative_source("bad", object())
    with pytest.raises(ValueError, match="'queue' must be a new Python identifier"):
        model.add_negative_source("queue", GivenNegatives(unit(2, 4)))
    with pytest.raises(ValueError, match="new Python identifier"):
        model.add_negative_source("my source", GivenNegatives(unit(2, 4)))


def test_a_queue_block_keeps_the_ids_and_labels_it_was_scored_with():
    # The monitors read a block's ids after the step's keys were written: they must be the scored ones.
    q = MomentumQueue(4, 4)
    q.add(unit(4, 4), ids=torch.tensor([1, 2, 3, 4]), labels=torch.tensor([0, 0, 1, 1]))
    block = q.source(Query(unit(1, 4), torch.tensor([[9]]), torch.tensor([[NO_ID]])))
    q.add(unit(2, 4, seed=5), ids=torch.tensor([7, 8]), labels=torch.tensor([2, 2]))
    assert block.ids.tolist() == [1, 2, 3, 4] and block.groups.tolist() == [0, 0, 1, 1]
