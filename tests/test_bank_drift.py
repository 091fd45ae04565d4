"""The bank's drift correction (mochi_retrieval.bank.drift): the paired estimate of the space's move, the
candidates and vectors it serves against a reference written out by hand, and that it undoes a translated
space's bias towards recently re-embedded rows."""
import pytest
import torch
import torch.nn.functional as F

from mochi_retrieval.bank import FaissNegativeBank
from mochi_retrieval.bank.drift import DriftCorrection
from mochi_retrieval.search import faiss_available


def test_the_paired_estimate_is_the_translation_and_chains_over_stamps():
    g = torch.Generator().manual_seed(0)
    stored, d1, d2 = torch.randn(6, 4, generator=g), torch.randn(4, generator=g), torch.randn(4, generator=g)
    drift = DriftCorrection()
    drift.reset(4, stamp=0)
    torch.testing.assert_close(drift.observe(stored, torch.zeros(6, dtype=torch.long), stored + d1, step=1), d1)
    # rows written at step 1 hold the space of m(1) = d1; measured again at step 3 after a further move d2
    torch.testing.assert_close(drift.observe(stored + d1, torch.ones(6, dtype=torch.long), stored + d1 + d2, 3),
                               d1 + d2)
    torch.testing.assert_close(drift.offsets(torch.tensor([3, 0, 1])), torch.stack([d1 + d2, 0 * d1, d1]))
    drift.prune(torch.tensor([3, 3]))
    with pytest.raises(KeyError, match="no offset for rows stamped"):
        drift.offsets(torch.tensor([1]))


def _bank(backend: str, emb: torch.Tensor, drift: bool = True) -> FaissNegativeBank:
    bank = FaissNegativeBank(backend, "cpu", drift_correction=drift)
    bank.refresh(emb, step=0)
    return bank


def _rolled(backend: str = "torch", drift: bool = True):
    """200 rows at step 0; rows 0..49 re-embedded at step 1 in a translated space."""
    g = torch.Generator().manual_seed(1)
    emb = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    move = 0.6 * F.normalize(torch.randn(16, generator=g), dim=0)
    fresh = F.normalize(emb[:50] + move, dim=1)
    bank = _bank(backend, emb, drift)
    bank.update(torch.arange(50), fresh, step=1, measure_drift=True)
    q = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    return bank, emb, fresh, q


def test_candidates_rank_and_serve_the_estimated_fresh_rows():
    bank, emb, fresh, q = _rolled()
    m1 = (fresh - emb[:50]).mean(0)  # m(1); m(0) = 0
    estimate = F.normalize(torch.cat([fresh, emb[50:] + m1]), dim=1)  # normalise(e + m(now) - m(stamp))
    scores = q @ estimate.T
    ceiling = 0.9 * scores.max(1).values  # drops each query's best few by the estimated score
    ids, vecs = bank.candidates(q, 5, exclude=[{0}] * 8, max_similarity=ceiling)
    ref = scores.clone()
    ref[:, 0] = -float("inf")
    ref[ref > ceiling.view(-1, 1)] = -float("inf")
    assert torch.equal(ids, ref.topk(5, dim=1).indices)
    torch.testing.assert_close(vecs, estimate[ids])
    shift = bank.last_drift_shift  # the score lift of each served row: 0 for the rows written at step 1
    stored = torch.cat([fresh, emb[50:]])
    torch.testing.assert_close(shift, (q.unsqueeze(1) * (estimate[ids] - stored[ids])).sum(-1))
    assert float(shift[ids < 50].abs().max()) < 1e-6 and float(shift[ids >= 50].abs().min()) > 0


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_and_torch_agree_under_drift_correction():
    a, _, _, q = _rolled("torch")
    b, _, _, _ = _rolled("faiss")
    ids_a, vec_a = a.candidates(q, 7)
    ids_b, vec_b = b.candidates(q, 7)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(vec_a, vec_b)


def test_without_the_correction_or_after_a_full_pass_the_stored_rows_are_served():
    bank, emb, fresh, q = _rolled(drift=False)
    ids, vecs = bank.candidates(q, 4)
    stored = torch.cat([fresh, emb[50:]])
    assert torch.equal(ids, (q @ stored.T).topk(4, dim=1).indices)
    torch.testing.assert_close(vecs, stored[ids])
    assert bank.last_drift_shift is None
    corrected, *_ = _rolled()
    corrected.refresh(stored, step=2)  # a full pass: the new reference frame
    ids, vecs = corrected.candidates(q, 4)
    torch.testing.assert_close(vecs, stored[ids])
    assert float(corrected.last_drift_shift.abs().max()) == 0.0


def test_the_correction_undoes_the_bias_towards_re_embedded_rows():
    """Rows embedded before the space moved score low for the moved queries; with the correction the top
    list is the fresh one's again, young rows no longer over-represented."""
    g = torch.Generator().manual_seed(2)
    centres = F.normalize(torch.randn(20, 32, generator=g), dim=1)
    truth = F.normalize(centres[torch.arange(2000) % 20] + 0.5 * torch.randn(2000, 32, generator=g), dim=1)
    move = 0.8 * F.normalize(torch.randn(32, generator=g), dim=0)
    old = F.normalize(truth - move, dim=1)  # embedded before the space moved by `move`
    queries = F.normalize(truth[torch.randperm(2000, generator=g)[:64]] + 0.3 * torch.randn(64, 32, generator=g),
                          dim=1)
    best = (queries @ truth.T).topk(16, dim=1).indices
    young = torch.arange(2000) < 250
    overlap, young_share = {}, {}
    for drift in (False, True):
        bank = _bank("torch", old, drift)
        bank.update(torch.arange(250), truth[:250], step=1, measure_drift=True)
        ids, _ = bank.candidates(queries, 16)
        overlap[drift] = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, best)) / ids.numel()
        young_share[drift] = young[ids].float().mean().item()
    truth_share = young[best].float().mean().item()
    assert young_share[False] > truth_share + 0.3  # the bias the correction is for
    assert abs(young_share[True] - truth_share) < 0.1
    assert overlap[True] > overlap[False] + 0.3


def test_the_correction_round_trips_through_the_state_dict():
    bank, emb, fresh, q = _rolled()
    state = bank.state_dict()
    assert {"drift_stamps", "drift_offsets", "drift_current"} <= set(state)
    restored = FaissNegativeBank("torch", "cpu", drift_correction=True)
    restored.load_state_dict(state)
    for a, b in zip(bank.candidates(q, 6), restored.candidates(q, 6)):
        torch.testing.assert_close(a, b)
    # a state saved without the correction loads with no offsets: the stored rows are served until measured
    older = FaissNegativeBank("torch", "cpu", drift_correction=True)
    older.load_state_dict({k: v for k, v in state.items() if not k.startswith("drift_")})
    ids, vecs = older.candidates(q, 6)
    torch.testing.assert_close(vecs, older.embeddings[ids])


def test_a_text_model_with_the_rolling_refresh_measures_and_reports_the_drift():
    from test_bank_refresh import _model, _train

    enc, model = _model(max_staleness=5, drift_correction=True)
    outs = _train(enc, model, 4)
    assert float(model.bank.drift.current.norm()) > 0  # measured on the slices before steps 1..3
    assert "bank_drift_shift" in outs[-1]["monitors"]
    assert torch.isfinite(outs[-1]["monitors"]["bank_drift_shift"])


def test_the_correction_refuses_indexes_it_cannot_rebuild_cheaply():
    from mochi_retrieval.bank import BankSettings

    with pytest.raises(ValueError, match="drift_correction"):
        BankSettings(drift_correction=True, shard=True)
    with pytest.raises(ValueError, match="drift_correction"):
        BankSettings(drift_correction=True, index="IVF16,Flat")
    with pytest.raises(ValueError, match="drift_correction"):
        FaissNegativeBank("faiss", "cpu", index="IVF16,Flat", drift_correction=True)
