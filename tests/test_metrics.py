"""Rank metrics: hand-computed cases and agreement with pytrec_eval (trec_eval)."""

from __future__ import annotations

import math

import pytest
import torch

from mochi_retrieval.metrics import (
    Qrels,
    compute_metrics,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    recall_curve,
)

DOCS = [f"d{i}" for i in range(8)]


def _hand_case() -> tuple[Qrels, torch.Tensor]:
    # q0: graded, one judged non-relevant doc; q1: one relevant doc, never retrieved in the top 2;
    # q2: judged but nothing relevant (trec_eval scores it 0 everywhere).
    qrels = {"q0": {"d0": 2, "d2": 1, "d5": 0}, "q1": {"d7": 1}, "q2": {"d3": 0}}
    q = Qrels.from_dict(qrels, ["q0", "q1", "q2"], DOCS)
    ranking = torch.tensor([[1, 0, 5, 2, 3], [4, 3, 7, 0, 1], [3, 2, 1, 0, 4]])
    return q, ranking


def test_hand_computed_recall_mrr_ndcg() -> None:
    qrels, ranking = _hand_case()
    gains = qrels.gains_of(ranking)
    assert gains.tolist() == [[0, 2, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    n_rel = qrels.num_relevant()
    assert n_rel.tolist() == [2, 1, 0]
    assert recall_at_k(gains, n_rel, 1).tolist() == [0.0, 0.0, 0.0]
    assert recall_at_k(gains, n_rel, 2).tolist() == [0.5, 0.0, 0.0]
    assert recall_at_k(gains, n_rel, 4).tolist() == [1.0, 1.0, 0.0]
    assert mrr_at_k(gains, 5).tolist() == pytest.approx([1 / 2, 1 / 3, 0.0])
    assert mrr_at_k(gains, 2).tolist() == pytest.approx([1 / 2, 0.0, 0.0])
    ideal = qrels.ideal_gains(5)
    assert ideal.tolist() == [[2, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    dcg0 = 2 / math.log2(3) + 1 / math.log2(5)
    idcg0 = 2 / math.log2(2) + 1 / math.log2(3)
    expected = [dcg0 / idcg0, (1 / math.log2(4)) / 1.0, 0.0]
    assert ndcg_at_k(gains, ideal, 5).tolist() == pytest.approx(expected, abs=1e-6)
    # cut at 2: q0 has d0 at rank 2 only; the ideal is cut too
    assert ndcg_at_k(gains, ideal, 2)[0].item() == pytest.approx((2 / math.log2(3)) / idcg0, abs=1e-6)


def test_compute_metrics_keys_and_means() -> None:
    qrels, ranking = _hand_case()
    out = compute_metrics(ranking, qrels, recall_ks=(4, 1, 2), mrr_k=5, ndcg_k=5)
    assert list(out) == ["recall@1", "recall@2", "recall@4", "mrr@5", "ndcg@5"]
    assert out["recall@4"] == pytest.approx(2 / 3)
    assert out["mrr@5"] == pytest.approx((1 / 2 + 1 / 3) / 3)


def test_perfect_ranking_scores_one() -> None:
    qrels = Qrels.from_dict({"a": {"d3": 3, "d1": 1, "d2": 2}}, ["a"], DOCS)
    ranking = torch.tensor([[3, 2, 1, 0]])
    out = compute_metrics(ranking, qrels, recall_ks=(3,), mrr_k=4, ndcg_k=4)
    assert out == pytest.approx({"recall@3": 1.0, "mrr@4": 1.0, "ndcg@4": 1.0})


def test_recall_curve_matches_recall_at_k() -> None:
    qrels, ranking = _hand_case()
    gains, n_rel = qrels.gains_of(ranking), qrels.num_relevant()
    curve = recall_curve(gains, n_rel)
    for k in range(1, 6):
        assert curve[k - 1].item() == pytest.approx(recall_at_k(gains, n_rel, k).mean().item())


def test_k_larger_than_ranking_raises() -> None:
    qrels, ranking = _hand_case()
    with pytest.raises(ValueError, match="k=6"):
        recall_at_k(qrels.gains_of(ranking), qrels.num_relevant(), 6)


def _random_case(seed: int, n_queries: int = 60, n_docs: int = 300, depth: int = 100):
    g = torch.Generator().manual_seed(seed)
    qrels: dict[str, dict[str, int]] = {}
    for qi in range(n_queries):
        n_judged = int(torch.randint(1, 12, (1,), generator=g))
        docs = torch.randperm(n_docs, generator=g)[:n_judged]
        grades = torch.randint(0, 4, (n_judged,), generator=g)  # 0 = judged non-relevant
        qrels[f"q{qi}"] = {f"d{d}": int(s) for d, s in zip(docs.tolist(), grades.tolist())}
    ranking = torch.stack([torch.randperm(n_docs, generator=g)[:depth] for _ in range(n_queries)])
    # make some queries easy: move their judged docs to the front
    for qi in range(0, n_queries, 3):
        judged = [int(d[1:]) for d in qrels[f"q{qi}"]]
        rest = [d for d in ranking[qi].tolist() if d not in judged]
        ranking[qi] = torch.tensor((judged + rest)[:depth])
    return qrels, ranking


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_pytrec_eval(seed: int) -> None:
    pytrec_eval = pytest.importorskip("pytrec_eval")
    n_docs, depth = 300, 100
    qrels_dict, ranking = _random_case(seed, n_docs=n_docs, depth=depth)
    qids = list(qrels_dict)
    dids = [f"d{i}" for i in range(n_docs)]
    qrels = Qrels.from_dict(qrels_dict, qids, dids)
    ks = (1, 3, 10, 100)
    ours = compute_metrics(ranking, qrels, recall_ks=ks, mrr_k=10, ndcg_k=10)
    ndcg20 = ndcg_at_k(qrels.gains_of(ranking), qrels.ideal_gains(20), 20)

    def run_at(cut: int) -> dict[str, dict[str, float]]:
        # distinct descending scores so trec_eval's own tie-breaking never matters
        return {q: {dids[d]: float(depth - r) for r, d in enumerate(ranking[i, :cut].tolist())}
                for i, q in enumerate(qids)}

    ref = pytrec_eval.RelevanceEvaluator(qrels_dict, {"recall.1,3,10,100", "ndcg_cut.10,20"}).evaluate(run_at(depth))
    ref_rr = pytrec_eval.RelevanceEvaluator(qrels_dict, {"recip_rank"}).evaluate(run_at(10))
    assert set(ref) == set(qids)
    for k in ks:
        assert ours[f"recall@{k}"] == pytest.approx(sum(ref[q][f"recall_{k}"] for q in qids) / len(qids), abs=1e-6)
    assert ours["ndcg@10"] == pytest.approx(sum(ref[q]["ndcg_cut_10"] for q in qids) / len(qids), abs=1e-6)
    assert ours["mrr@10"] == pytest.approx(sum(ref_rr[q]["recip_rank"] for q in qids) / len(qids), abs=1e-6)
    # per query too, not just the means
    per_q = torch.tensor([ref[q]["ndcg_cut_20"] for q in qids], dtype=torch.float32)
    torch.testing.assert_close(ndcg20, per_q, atol=1e-6, rtol=0)
