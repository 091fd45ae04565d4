"""InfoNCE on closed-form cases and against a direct cross-entropy reference."""
import math

import device_checks
import pytest
import torch
import torch.nn.functional as F
from device_checks import DEVICES

from mochi_retrieval.loss import (
    MoCHiConfig,
    MoCHiLoss,
    contrastive_loss,
    proxy_accuracy,
)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_identical_keys_give_log_m_plus_one(device):
    """Positive and all M negatives equal: every logit equal, loss = log(M + 1)."""
    device_checks.check_identical_keys(device)


def test_orthogonal_case_closed_form():
    """q.k = 1, q.n = 0 for all M: loss = log(1 + M exp(-1/T))."""
    q = torch.eye(8)[:2]
    bank = torch.eye(8)[2:]
    out = contrastive_loss(q, q.clone(), bank, temperature=0.5)
    assert out.loss.item() == pytest.approx(math.log(1 + 6 * math.exp(-2.0)), rel=1e-6)
    assert out.accuracy.item() == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_matches_cross_entropy_reference(device):
    device_checks.check_cross_entropy_reference(device)


def test_mask_drops_entries_from_loss():
    q, k, bank = unit(3, 8, seed=1), unit(3, 8, seed=2), unit(10, 8, seed=3)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, 4:] = True
    masked = contrastive_loss(q, k, bank, 0.2, neg_mask=mask)
    kept = contrastive_loss(q, k, bank[:4], 0.2)
    torch.testing.assert_close(masked.loss, kept.loss)


def test_accuracy_uses_real_logits_only():
    """A synthetic logit above the positive must not change proxy accuracy."""
    q = torch.eye(4)[:2]
    bank = torch.eye(4)[2:]
    pos = (q * q).sum(1)
    neg = q @ bank.t()
    assert proxy_accuracy(pos, neg).item() == 1.0
    mochi = MoCHiConfig(n_hard=2, n_mix=1, n_query_mix=1, warmup_epochs=0)
    out = contrastive_loss(q, q.clone(), bank, 0.2, mochi=mochi, epoch=1)
    assert out.synthetic_logits.shape == (2, 2)
    assert out.accuracy.item() == 1.0
    half = torch.tensor([1.0, 0.0])
    assert proxy_accuracy(half, torch.tensor([[0.5], [0.5]])).item() == 0.5


def test_mochi_warmup_switches_mixing_on():
    q, k, bank = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(32, 8, seed=3)
    loss = MoCHiLoss(0.2, MoCHiConfig(n_hard=8, n_mix=4, n_query_mix=2, warmup_epochs=2.0))
    assert loss(q, k, bank, epoch=1.99).synthetic_logits is None
    on = loss(q, k, bank, epoch=2.0)
    assert on.synthetic_logits.shape == (4, 6)
    # Synthetic logits only add to the denominator, so the loss rises.
    assert on.loss > loss(q, k, bank, epoch=0).loss


@pytest.mark.parametrize("device", DEVICES)
def test_loss_with_mochi_equals_reference_on_materialised_points(device):
    device_checks.check_mochi_loss_reference(device)


def test_copies_only_control_appends_copies_of_pool_members():
    """The re-weighting control: the same draws as MoCHi, but each pair point is the pool member n_i itself,
    so its logit is q . n_i and the loss is InfoNCE over [positive, negatives, the copies] written out."""
    q, k, bank = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(40, 8, seed=3)
    q.requires_grad_(True)
    settings = dict(n_hard=6, n_mix=4, n_query_mix=0, warmup_epochs=0)
    mix = contrastive_loss(q, k, bank, 0.2, mochi=MoCHiConfig(**settings), generator=torch.Generator().manual_seed(7))
    out = contrastive_loss(q, k, bank, 0.2, mochi=MoCHiConfig(**settings, copies_only=True),
                           generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.plan.pair_i, mix.plan.pair_i)  # same draws, only a changes
    assert (mix.plan.alpha < 1).all() and (out.plan.alpha == 1).all()
    copies = bank[out.plan.hard_idx.gather(1, out.plan.pair_i)]  # (B, s, D)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T, torch.einsum("bd,bsd->bs", q, copies)], 1) / 0.2
    want = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(out.loss, want)
    g_out, = torch.autograd.grad(out.loss, q)
    g_want, = torch.autograd.grad(want, q)
    torch.testing.assert_close(g_out, g_want)
    assert not torch.allclose(mix.loss, out.loss)


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(n_hard=1, n_mix=1), "n_hard"), (dict(beta_max=1.5), "beta_max"), (dict(n_mix=-1), "n_mix"),
     (dict(warmup_epochs=-1), "warmup_epochs"), (dict(n_mix=0, copies_only=True), "copies_only")],
)
def test_config_errors_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MoCHiConfig(**kwargs)


def test_bad_temperature_and_shapes():
    q = unit(2, 4)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(q, q, unit(3, 4), 0.0)
    with pytest.raises(ValueError, match="q and k"):
        contrastive_loss(q, unit(3, 4), unit(3, 4), 0.2)
    with pytest.raises(ValueError, match="mask shape"):
        contrastive_loss(q, q, unit(3, 4), 0.2, neg_mask=torch.zeros(2, 2, dtype=torch.bool))
