"""The bank's refresh policy (initial pass, full refresh, rolling slices) and its place in TextMoCo: the
staleness bound, the schedule in optimiser steps under gradient accumulation, process shares."""
import math

import pytest
import torch

from mochi_retrieval.bank import BankSettings, RefreshPolicy
from mochi_retrieval.bank.refresh import shard


@pytest.mark.parametrize("rows, staleness", [(10, 3), (1000, 7), (5, 10), (97, 97), (64, 1)])
def test_rolling_slices_bound_every_rows_staleness(rows, staleness):
    """Simulated over 3 cycles: after the initial pass (step 0), no row is ever more than S steps old."""
    policy = RefreshPolicy(rows, 0, staleness)
    assert policy.slice_size == min(rows, math.ceil(rows / staleness))
    stamp = torch.zeros(rows, dtype=torch.long)
    for step in range(1, 3 * staleness + 5):
        stamp[policy.rolling_rows(step)] = step
        assert int((step - stamp).max()) <= staleness, step
    # Each slice is distinct within a cycle, and a cycle covers every row.
    cycle = math.ceil(rows / policy.slice_size)
    covered = torch.cat([policy.rolling_rows(s) for s in range(1, cycle + 1)])
    assert set(covered.tolist()) == set(range(rows))


def test_full_refresh_replaces_the_slice_and_off_means_empty():
    policy = RefreshPolicy(100, full_every=5, max_staleness=20)
    assert [s for s in range(12) if policy.full_due(s)] == [5, 10]
    assert policy.rolling_rows(5).numel() == 0 and policy.rolling_rows(4).numel() == 5
    off = RefreshPolicy(100)
    assert off.slice_size == 0 and not any(off.full_due(s) for s in range(50))
    assert off.rolling_rows(3).numel() == 0


@pytest.mark.parametrize("n, world", [(10, 3), (1, 2), (0, 2), (7, 1)])
def test_process_shares_restore_the_order_and_may_be_empty(n, world):
    rows = torch.arange(n) * 3
    shares = [shard(rows, world, r) for r in range(world)]
    assert torch.equal(torch.cat(shares), rows)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="max_staleness"):
        BankSettings(max_staleness=-1)
    with pytest.raises(ValueError, match="corpus"):
        BankSettings(corpus=" ")


# --------------------------------------------------------------------------- in TextMoCo
def _model(steps_per_update: int = 1, **bank):
    from test_text_model import DOCS, GROUPS, T, ToyTextEncoder

    from mochi_retrieval.text_model import BankCorpus, TextMoCo

    enc = ToyTextEncoder()
    settings = BankSettings(**{"candidates": 2, "backend": "torch", "device": "cpu", "update_with_keys": False,
                               **bank})
    model = TextMoCo(enc, GROUPS, queue_size=0, temperature=T, bank=settings,
                     bank_corpus=BankCorpus(torch.arange(len(DOCS)), DOCS), steps_per_update=steps_per_update)
    return enc, model


def _train(enc, model, micro_steps: int, lr: float = 5.0, accum: int = 1):
    from test_text_model import batch_of

    opt = torch.optim.SGD(enc.parameters(), lr=lr)
    outs = []
    for step in range(micro_steps):
        out = model(**batch_of(enc, [step % 10, (step + 3) % 10, (step + 6) % 10]), step=step)
        outs.append(out)
        (out["loss"] / accum).backward()
        if (step + 1) % accum == 0:
            opt.step()
            opt.zero_grad()
    return outs


def test_rolling_refresh_re_embeds_its_slice_with_the_current_encoder():
    from test_text_model import DOCS, unit

    enc, model = _model(max_staleness=5)  # 10 rows: slices of 2 rows a step
    _train(enc, model, 3)  # the initial pass before step 0, slices before steps 1 and 2
    assert [r["kind"] for r in model.refresh_log] == ["initial"]
    assert model.bank.stamps.tolist() == [1, 1, 2, 2, 0, 0, 0, 0, 0, 0]
    model.maintain_bank(3)
    with torch.no_grad():
        fresh = unit(enc(enc.tokenize(DOCS)))
    torch.testing.assert_close(model.bank.embeddings[4:6], fresh[4:6], atol=1e-6, rtol=0)
    assert not torch.allclose(model.bank.embeddings[6:], fresh[6:], atol=1e-3)  # not yet re-embedded
    assert model.bank_seconds["rolling"] > 0


def test_bank_schedule_counts_optimiser_steps_under_gradient_accumulation():
    enc, model = _model(steps_per_update=2, refresh_every=2)
    _train(enc, model, 8, accum=2)  # 4 optimiser steps: the initial pass, a full refresh before step 2
    assert [(r["kind"], r["step"]) for r in model.refresh_log] == [("initial", 0), ("full", 2)]


def test_monitors_report_the_staleness_of_served_rows_and_the_encode_share():
    enc, model = _model(max_staleness=5)
    outs = _train(enc, model, 4)
    for step, out in enumerate(outs):
        m = out["monitors"]
        assert 0 <= float(m["bank_staleness_mean"]) <= float(m["bank_staleness_max"]) <= min(step, 5)
        assert 0.0 <= float(m["bank_encode_share"]) <= 1.0
        assert 0 <= float(m["bank_age_mean"]) <= min(step, 5)


def test_mined_documents_are_written_back_when_asked():
    from test_text_model import DOCS, batch_of, unit

    enc, model = _model(mined_negatives=1, candidates=1, update_with_mined=True)
    _train(enc, model, 1)  # the initial pass, then one optimiser step: the bank is now stale
    with torch.no_grad():
        fresh = unit(enc(enc.tokenize(DOCS)))
    out = model(**batch_of(enc, [1, 4, 7]), step=1)
    written = (model.bank.stamps == 1).nonzero().view(-1)
    assert written.numel() >= 1 and out["monitors"]["mass_mined"] > 0
    torch.testing.assert_close(model.bank.embeddings[written], fresh[written], atol=1e-6, rtol=0)
    untouched = (model.bank.stamps == 0).nonzero().view(-1)
    assert not torch.allclose(model.bank.embeddings[untouched], fresh[untouched], atol=1e-3)
    enc2, off = _model(mined_negatives=1, candidates=1, update_with_mined=False)
    _train(enc2, off, 2)
    assert (off.bank.stamps == 0).all()


def test_bank_round_trips_through_the_model_state_dict():
    enc, model = _model(max_staleness=5)
    _train(enc, model, 3)
    state = model.state_dict()
    enc2, fresh = _model(max_staleness=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bank.embeddings, model.bank.embeddings)
    assert torch.equal(fresh.bank.stamps, model.bank.stamps)
    assert torch.equal(fresh.bank.text_group, model.bank.text_group)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # tensors only (weights_only loads)
    # A model state without a bank (an older checkpoint) still loads; the bank then starts with its pass.
    state = {k: v for k, v in state.items() if not k.startswith("bank.")}
    enc3, old = _model(max_staleness=5)
    old.load_state_dict(state)
    assert len(old.bank) == 0


def test_initial_pass_cache_hits_only_for_the_same_weights_texts_and_settings(tmp_path):
    from test_text_model import DOCS

    enc, model = _model(cache_dir=str(tmp_path))
    model.maintain_bank(0)
    assert len(list(tmp_path.glob("bank-initial-*.pt"))) == 1 and not model.refresh_log[0]["cached"]
    enc2, again = _model(cache_dir=str(tmp_path))
    again.maintain_bank(0)
    assert again.refresh_log[0]["cached"] and torch.equal(again.bank.embeddings, model.bank.embeddings)
    # Other weights: a miss, and a second file.
    enc3, moved = _model(cache_dir=str(tmp_path))
    with torch.no_grad():
        enc3.emb.weight.add_(0.1)
    moved.maintain_bank(0)
    assert not moved.refresh_log[0]["cached"] and len(list(tmp_path.glob("bank-initial-*.pt"))) == 2
    # Other encoding settings: a miss too.
    enc4, batch = _model(cache_dir=str(tmp_path), encode_batch_size=3)
    batch.maintain_bank(0)
    assert not batch.refresh_log[0]["cached"]
    assert len(DOCS) == len(model.bank)
