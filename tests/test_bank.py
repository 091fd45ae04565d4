"""FaissNegativeBank: FAISS against the exact torch twin and a brute-force reference; filters; state."""
from __future__ import annotations

import io
import logging

import device_checks
import pytest
import torch
from device_checks import BANK_CASES, DEVICES
from device_checks import bank_data as _data
from device_checks import bank_positives as _positives
from device_checks import bank_reference as _reference

from mochi_retrieval.bank import FaissNegativeBank
from mochi_retrieval.loss import MoCHiConfig, contrastive_loss
from mochi_retrieval.search import faiss_num_gpus, l2_normalize

BACKENDS = ["faiss", "torch"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BANK_CASES))
def test_backends_agree_with_reference(device: str, case: str) -> None:
    """Both backends, their index (or storage) on ``device`` where possible, equal the brute-force reference."""
    device_checks.check_bank_case(device, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_excludes_positives_and_identical_texts(backend: str) -> None:
    emb, _ = _data(300)
    emb[1] = emb[0]  # document 1 has the same text (and embedding) as document 0
    groups = torch.arange(300)
    groups[1] = 0
    q = emb[:1] + 0.01 * emb[5:6]
    bank = FaissNegativeBank(backend=backend)
    bank.refresh(emb, text_group=groups)
    idx, _ = bank.candidates(q, 5, exclude=None)
    assert set(idx[0, :2].tolist()) == {0, 1}  # without exclusions the twins come first
    idx, _ = bank.candidates(q, 5, exclude=[{0}], exclude_text_dupes=False)
    assert idx[0, 0] == 1 and 0 not in idx[0]
    idx, _ = bank.candidates(q, 5, exclude=[{0}])
    assert 0 not in idx[0] and 1 not in idx[0]
    padded, _ = bank.candidates(q, 5, exclude=torch.tensor([[-1, 0, -1]]))  # tensor form, -1 padding
    assert torch.equal(padded, idx)
    bank.refresh(emb, text_group=torch.where(groups == 0, -1, groups))  # negative group = in no group
    assert bank.candidates(q, 5, exclude=[{0}])[0][0, 0] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_window_shifts_the_list(backend: str) -> None:
    emb, q = _data(800)
    bank = FaissNegativeBank(backend=backend)
    bank.refresh(emb)
    full, _ = bank.candidates(q, 30, exclude=_positives(len(q), 800))
    windowed, _ = bank.candidates(q, 20, exclude=_positives(len(q), 800), skip_top=10)
    assert torch.equal(windowed, full[:, 10:30])


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_ceiling(backend: str) -> None:
    emb, q = _data(800)
    bank = FaissNegativeBank(backend=backend, slack=0)
    bank.refresh(emb)
    idx, vec = bank.candidates(q, 10, max_similarity=0.2)
    sims = torch.einsum("bd,bkd->bk", l2_normalize(q), vec)
    assert (sims <= 0.2 + 1e-6).all()
    assert bank.last_search_rounds > 1  # the first search was too short: the bank searched again
    assert torch.equal(idx, _reference(emb, q, 10, ceiling=0.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_replaces_stale_embeddings(backend: str) -> None:
    old, q = _data(500, seed=0)
    new, _ = _data(700, seed=5)
    bank = FaissNegativeBank(backend=backend)
    bank.refresh(old)
    bank.candidates(q, 10)
    bank.refresh(new * 3.0)  # not normalised: the bank normalises
    assert len(bank) == 700 and bank.last_refresh_seconds > 0
    idx, _ = bank.candidates(q, 10)
    assert torch.equal(idx, _reference(new, q, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_in_place_equals_fresh_refresh(backend: str) -> None:
    emb, q = _data(600)
    bank = FaissNegativeBank(backend=backend)
    bank.refresh(emb)
    bank.candidates(q, 10)  # builds the index before the update
    rows = torch.tensor([3, 70, 555])
    patch = l2_normalize(q[:3].clone())  # these rows now sit exactly on queries 0-2
    bank.update(rows, patch * 2)
    patched = emb.clone()
    patched[rows] = patch
    idx, _ = bank.candidates(q, 10)
    assert torch.equal(idx, _reference(patched, q, 10))
    assert idx[0, 0] == 3 and idx[1, 0] == 70 and idx[2, 0] == 555


def test_external_ids() -> None:
    emb, q = _data(400)
    ids = torch.arange(400) * 10 + 7
    bank = FaissNegativeBank()
    bank.refresh(emb, ids=ids)
    excl = [{int(ids[i]) for i in s} for s in _positives(len(q), 400)]
    got, _ = bank.candidates(q, 8, exclude=excl)
    ref = _reference(emb, q, 8, exclude=_positives(len(q), 400))
    assert torch.equal(got, ids[ref])
    bank.update(ids[ref[0, :1]], -l2_normalize(q[:1]))  # push query 0's best away
    assert int(ids[ref[0, 0]]) not in bank.candidates(q, 8, exclude=excl)[0][0].tolist()
    with pytest.raises(ValueError, match="not in the bank"):
        bank.update(torch.tensor([8]), emb[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_many_candidates(backend: str) -> None:
    emb, q = _data(50)
    bank = FaissNegativeBank(backend=backend)
    bank.refresh(emb)
    with pytest.raises(ValueError, match=r"51 candidates.*only 50 documents"):
        bank.candidates(q, 51)
    with pytest.raises(ValueError, match=r"k=40 candidates.*has only 35 left.*skip_top=5.*holds 50 documents"):
        bank.candidates(q, 40, skip_top=5, exclude=[set(range(10))] * len(q))
    with pytest.raises(RuntimeError, match="refresh"):
        FaissNegativeBank(backend=backend).candidates(q, 1)


@pytest.mark.skipif(faiss_num_gpus() > 0 or torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_request_without_gpu_falls_back(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    emb, q = _data(200)
    with caplog.at_level(logging.WARNING, logger="mochi_retrieval.bank"):
        bank = FaissNegativeBank(backend=backend, device="cuda")
    assert "falling back to CPU" in caplog.text and not bank.use_gpu
    bank.refresh(emb)
    assert torch.equal(bank.candidates(q, 5)[0], _reference(emb, q, 5))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mochi_retrieval.bank"):
        FaissNegativeBank(backend=backend, device="auto")
    assert not caplog.records  # "auto" falls back silently


def test_state_dict_round_trip() -> None:
    emb, q = _data(300)
    groups = torch.arange(300) // 2
    bank = FaissNegativeBank()
    bank.refresh(emb, ids=torch.arange(300) + 1000, text_group=groups)
    bank.update(torch.tensor([1005]), l2_normalize(q[:1]))
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    restored = FaissNegativeBank(backend="torch")
    restored.load_state_dict(torch.load(buf, weights_only=True))
    excl = [{1000 + 2 * i} for i in range(len(q))]
    a, va = bank.candidates(q, 12, exclude=excl)
    b, vb = restored.candidates(q, 12, exclude=excl)
    assert torch.equal(a, b) and torch.equal(va, vb)
    assert torch.equal(restored.text_group, groups)


def test_union_with_queue_hard_pool() -> None:
    """Bank candidates join the queue in the loss; MoCHi's hard pool is the exact top-N of the union."""
    g = torch.Generator().manual_seed(3)
    b, d, n_queue, c, n_hard = 8, 16, 256, 32, 48
    emb = l2_normalize(torch.randn(2000, d, generator=g))
    q = l2_normalize(emb[:b] + 0.3 * torch.randn(b, d, generator=g))
    keys = emb[:b]
    queue = l2_normalize(torch.randn(n_queue, d, generator=g))
    bank = FaissNegativeBank()
    bank.refresh(emb)
    _, cand = bank.candidates(q, c, exclude=[{i} for i in range(b)])
    cfg = MoCHiConfig(n_hard=n_hard, n_mix=16, n_query_mix=8)
    out = contrastive_loss(q, keys, (queue, cand), 0.05, mochi=cfg, generator=torch.Generator().manual_seed(0))
    union = torch.cat([q @ queue.T, torch.einsum("bd,bcd->bc", q, cand)], dim=1)
    top = union.topk(n_hard, dim=1).indices
    assert torch.equal(out.plan.hard_idx.sort(1).values, top.sort(1).values)
    assert (out.plan.hard_idx >= n_queue).any(1).all()  # every query's pool draws from the bank block
    assert (out.plan.hard_idx < n_queue).any()  # and the queue block still contributes
    assert torch.isfinite(out.loss)


class _FakeGpuFaiss:
    """Records how the bank moves its index to GPUs (no GPU needed)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    class GpuMultipleClonerOptions:
        shard = False

    def StandardGpuResources(self):
        return "resources"

    def index_cpu_to_all_gpus(self, index, co=None):
        self.calls.append(("all", co.shard))
        return index

    def index_cpu_to_gpu(self, res, device, index):
        self.calls.append(("one", device))
        return index


@pytest.mark.parametrize("gpus, want", [(1, ("one", 0)), (4, ("all", True))])
def test_gpu_index_is_sharded_over_several_gpus(monkeypatch, gpus, want) -> None:
    import faiss

    from mochi_retrieval.bank import index as index_module

    monkeypatch.setattr(index_module, "faiss_num_gpus", lambda: gpus)
    fake = _FakeGpuFaiss()
    bank = FaissNegativeBank(device="cpu")
    assert bank.index._to_gpu(fake, faiss.IndexFlatIP(4)) is not None and fake.calls == [want]


def test_allow_fewer_pads_queries_left_short_instead_of_raising():
    emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    bank = FaissNegativeBank("torch", "cpu")
    bank.refresh(emb)
    q = emb[:2]
    ceiling = torch.tensor([1.1, -2.0])  # query 1: nothing scores below -2
    with pytest.raises(ValueError, match="has only 0 left"):
        bank.candidates(q, 3, exclude=[{0}, {1}], max_similarity=ceiling)
    ids, vecs = bank.candidates(q, 3, exclude=[{0}, {1}], max_similarity=ceiling, allow_fewer=True)
    assert (ids[0] >= 0).all() and (ids[1] == -1).all()
    assert vecs[1].abs().sum() == 0
    want = [j for j in torch.argsort(emb[1:] @ q[0], descending=True).add(1).tolist()][:3]
    assert ids[0].tolist() == want
