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
