"""bank.index: FAISS index_factory types against the exact oracle (torch), their training, search settings,
writes, the recall monitor and the errors for bad strings."""
import pytest
import torch
from test_bank_shard import clustered

from mochi_retrieval.bank import BankSettings, FaissNegativeBank

pytest.importorskip("faiss")


def _pair(spec, params=None, n=2000, d=16, recall_queries=64):
    emb = clustered(n, d, 3)
    exact, approx = FaissNegativeBank("torch", "cpu"), FaissNegativeBank(
        "faiss", "cpu", index=spec, search_params=params, recall_queries=recall_queries)
    for bank in (exact, approx):
        bank.refresh(emb, step=0)
    q = clustered(40, d, 4)
    return emb, q, exact, approx


@pytest.mark.parametrize("spec, params", [("Flat", None), ("IVF16,Flat", "nprobe=16")])
def test_flat_and_ivf_probing_every_list_equal_exact_search(spec, params):
    emb, q, exact, approx = _pair(spec, params)
    excl = torch.randint(0, 2000, (40, 2), generator=torch.Generator().manual_seed(0))
    want = exact.candidates(q, 12, exclude=excl, skip_top=2)
    got = approx.candidates(q, 12, exclude=excl, skip_top=2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert approx.last_recall == 1.0
    # Writes reach the index (IVF: in place) before the next search.
    new = clustered(300, 16, 9)
    for bank in (exact, approx):
        bank.update(torch.arange(0, 600, 2), new, step=1)
    assert torch.equal(approx.candidates(q, 12)[0], exact.candidates(q, 12)[0])


def test_recall_monitor_is_below_one_for_a_coarse_index_on_clustered_data():
    _, q, exact, approx = _pair("IVF64,Flat", "nprobe=1")
    assert approx.last_recall is not None and 0.0 < approx.last_recall < 1.0
    _, _, _, off = _pair("IVF64,Flat", "nprobe=1", recall_queries=0)
    assert off.last_recall is None


def _tie_extended_recall(bank, k=16, queries=64):
    """The monitor's reference: per query (the bank's own rows it samples), the exact top k extended by every
    row tied with the k-th score, and the share of the index's k results inside that set."""
    rows = bank.embeddings
    pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:queries]
    q = rows[pick]
    scores = q @ rows.T
    kth = scores.topk(k, dim=1).values[:, -1:]
    _, found = bank.index.search(rows, q, k)
    hits = [len(set(f.tolist()) & set((s >= t - 1e-5).nonzero().flatten().tolist()))
            for f, s, t in zip(found, scores, kth)]
    return sum(hits) / (k * len(hits)), found, scores.topk(k, dim=1).indices


def test_recall_monitor_counts_identical_rows_as_found():
    # 250 distinct rows, each 3 times (16 is no multiple of 3: the cut splits a group of copies)
    emb = clustered(250, 16, 3).repeat(3, 1)
    bank = FaissNegativeBank("faiss", "cpu", index="IVF16,Flat", search_params="nprobe=16")
    bank.refresh(emb, step=0)
    want, found, exact_ids = _tie_extended_recall(bank)
    by_id = (found.unsqueeze(2) == exact_ids.unsqueeze(1)).any(2).float().mean().item()
    assert by_id < 1.0  # the scenario has ties an id comparison gets wrong
    assert want == 1.0 and bank.last_recall == 1.0  # every list probed: exact scores
    coarse = FaissNegativeBank("faiss", "cpu", index="IVF64,Flat", search_params="nprobe=1")
    coarse.refresh(torch.cat([clustered(1500, 16, 3), clustered(500, 16, 3)[:250].repeat(2, 1)]), step=0)
    assert coarse.last_recall == pytest.approx(_tie_extended_recall(coarse)[0]) and coarse.last_recall < 1.0


@pytest.mark.parametrize("spec", ["SQfp16", "HNSW16", "IVF8,PQ8"])
def test_other_types_build_train_and_mostly_agree_with_exact(spec):
    emb, q, exact, approx = _pair(spec, None)
    want, got = exact.candidates(q, 10)[0], approx.candidates(q, 10)[0]
    overlap = (got.unsqueeze(2) == want.unsqueeze(1)).any(2).float().mean()
    assert overlap > 0.3 and approx.last_recall > 0.3, (spec, overlap, approx.last_recall)  # a sanity floor
    for bank in (exact, approx):  # a type that cannot remove re-adds every row after a write
        bank.update(torch.arange(10), emb[10:20], step=1)
    assert approx.candidates(q, 10)[0].shape == (40, 10)


def test_bad_index_strings_and_settings_are_clear_errors():
    with pytest.raises(ValueError, match="bank.index='IVF,Nope'"):
        BankSettings(index="IVF,Nope")
    with pytest.raises(ValueError, match="search_params='nprobe=abc'"):
        BankSettings(index="IVF16,Flat", search_params="nprobe=abc")
    with pytest.raises(ValueError, match="index"):
        BankSettings(index="HNSW32", backend="torch")
    bank = FaissNegativeBank("faiss", "cpu", index="IVF256,Flat")
    with pytest.raises(ValueError, match=r"'IVF256,Flat' needs at least 256 rows to train; this bank \(shard\) "
                                         r"holds 100"):
        bank.refresh(clustered(100, 16, 0))
