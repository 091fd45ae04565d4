"""Rank metrics for retrieval: recall@k, MRR@k and nDCG@k.

The definitions follow ``trec_eval`` as wrapped by ``pytrec_eval`` and used by
BEIR, so numbers are comparable with published BEIR tables:

- A document is *relevant* to a query when its qrels grade is > 0.
- ``recall@k = |relevant ∩ top-k| / |relevant|``.
- ``mrr@k = 1 / rank`` of the first relevant document within the top k
  (0 when none is there).
- ``ndcg@k = DCG@k / IDCG@k`` with linear gain (the grade itself) and the
  ``1 / log2(rank + 1)`` discount; the ideal ranking sorts all of the query's
  judged grades, so graded qrels and several relevant documents count.
- A query without any relevant document scores 0 on every metric (as
  trec_eval does). Grades <= 0 carry no gain.

Everything works on index space: queries ``0..Q-1`` and documents ``0..N-1``.
Rankings come in as a ``(Q, K)`` tensor of document indices, best first
(the output of :func:`mochi_retrieval.search.search`). The judgements come in
as a :class:`Qrels`, a sparse list of ``(query, doc, grade)`` triples; the
grades of the retrieved documents are looked up with one sort and one
``searchsorted``, so 10k queries x 100 ranks take milliseconds.

Example::

    qrels = Qrels.from_dict({"q1": {"d1": 2, "d3": 1}}, query_ids=["q1"],
                            doc_ids=["d1", "d2", "d3"])
    ranking = torch.tensor([[1, 0, 2]])            # d2, d1, d3
    compute_metrics(ranking, qrels, recall_ks=(1, 3))
    # {'recall@1': 0.0, 'recall@3': 1.0, 'mrr@10': 0.5, 'ndcg@10': ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Qrels:
    """Sparse relevance judgements in index space.

    Attributes:
        query_idx: (R,) int64 query index of each judgement.
        doc_idx: (R,) int64 document index of each judgement.
        grade: (R,) float32 relevance grade; > 0 means relevant.
        num_queries: Q, the number of queries being evaluated.
        num_docs: N, the corpus size.
    """

    query_idx: Tensor
    doc_idx: Tensor
    grade: Tensor
    num_queries: int
    num_docs: int

    @classmethod
    def from_dict(
        cls,
        qrels: Mapping[str, Mapping[str, float]],
        query_ids: Sequence[str],
        doc_ids: Sequence[str],
    ) -> "Qrels":
        """Build from BEIR-style ``{query_id: {doc_id: grade}}``.

        Raises:
            KeyError: a query or document id is not in ``query_ids`` / ``doc_ids``
                (validate first; :mod:`mochi_retrieval.data.beir` does).
        """
        q_pos = {q: i for i, q in enumerate(query_ids)}
        d_pos = {d: i for i, d in enumerate(doc_ids)}
        qi, di, gr = [], [], []
        for qid, docs in qrels.items():
            for did, grade in docs.items():
                qi.append(q_pos[qid])
                di.append(d_pos[did])
                gr.append(float(grade))
        return cls(
            torch.tensor(qi, dtype=torch.int64),
            torch.tensor(di, dtype=torch.int64),
            torch.tensor(gr, dtype=torch.float32),
            len(query_ids),
            len(doc_ids),
        )

    def num_relevant(self) -> Tensor:
        """(Q,) int64 number of documents with grade > 0 per query."""
        rel = (self.grade > 0).to(torch.int64)
        return torch.zeros(self.num_queries, dtype=torch.int64).index_add_(0, self.query_idx, rel)

    def ideal_gains(self, depth: int) -> Tensor:
        """(Q, depth) float32: each query's positive grades sorted descending, 0-padded."""
        gains = self.grade.clamp(min=0)
        # Sort by query, then by grade descending, then find each row's rank in its query.
        order = torch.argsort(gains, descending=True, stable=True)
        order = order[torch.argsort(self.query_idx[order], stable=True)]
        q_sorted, g_sorted = self.query_idx[order], gains[order]
        counts = torch.bincount(q_sorted, minlength=self.num_queries)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts[q_sorted]
        keep = rank < depth
        out = torch.zeros(self.num_queries, depth, dtype=torch.float32)
        out[q_sorted[keep], rank[keep]] = g_sorted[keep]
        return out

    def gains_of(self, ranking: Tensor) -> Tensor:
        """Look up the grade of every retrieved document.

        Args:
            ranking: (Q, K) int64 document indices, best first.
        Returns:
            (Q, K) float32 grades, 0 for unjudged documents; negative grades
            are kept (callers clamp or threshold as their metric says).
        """
        if ranking.shape[0] != self.num_queries:
            raise ValueError(f"ranking has {ranking.shape[0]} rows but qrels cover {self.num_queries} queries")
        # numpy: single-threaded lookups beat torch's thread pool on tensors this small
        ranked = ranking.cpu().to(torch.int64).numpy()
        sorted_keys, sorted_grades = self._sorted_keys
        if len(sorted_keys) == 0:
            return torch.zeros(ranking.shape, dtype=torch.float32)
        wanted = np.arange(ranked.shape[0], dtype=np.int64)[:, None] * self.num_docs + ranked
        pos = np.minimum(np.searchsorted(sorted_keys, wanted), len(sorted_keys) - 1)
        grades = np.where(sorted_keys[pos] == wanted, sorted_grades[pos], np.float32(0))
        return torch.from_numpy(grades.astype(np.float32, copy=False))

    @cached_property
    def _sorted_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """Judgement keys ``query * N + doc``, sorted, with their grades (computed once)."""
        keys = self.query_idx.numpy() * self.num_docs + self.doc_idx.numpy()
        order = np.argsort(keys, kind="stable")
        return keys[order], self.grade.numpy()[order]


def _check_k(k: int, width: int, name: str) -> None:
    if k < 1:
        raise ValueError(f"{name}: k must be >= 1, got {k}")
    if k > width:
        raise ValueError(f"{name}: k={k} but the ranking holds only {width} documents per query")


def recall_at_k(gains: Tensor, num_relevant: Tensor, k: int) -> Tensor:
    """Per-query recall@k.

    Args:
        gains: (Q, K) grades of the ranked documents, best first.
        num_relevant: (Q,) number of documents with grade > 0 per query.
        k: cut-off, 1 <= k <= K.
    Returns:
        (Q,) float32, 0 where a query has no relevant document.
    """
    _check_k(k, gains.shape[1], "recall")
    hits = (gains[:, :k] > 0).sum(1).to(torch.float32)
    return torch.where(num_relevant > 0, hits / num_relevant.clamp(min=1), torch.zeros_like(hits))


def recall_curve(gains: Tensor, num_relevant: Tensor) -> Tensor:
    """Mean recall@k for every k = 1..K at once.

    Args:
        gains: (Q, K) grades of the ranked documents.
        num_relevant: (Q,) number of relevant documents per query.
    Returns:
        (K,) float32; entry ``k-1`` equals ``recall_at_k(..., k).mean()``.
    """
    hits = (gains > 0).to(torch.float32).cumsum(1)
    per_query = torch.where(
        (num_relevant > 0).unsqueeze(1), hits / num_relevant.clamp(min=1).unsqueeze(1), torch.zeros_like(hits)
    )
    return per_query.mean(0)


def mrr_at_k(gains: Tensor, k: int) -> Tensor:
    """Per-query reciprocal rank of the first relevant document within the top k.

    Args:
        gains: (Q, K) grades of the ranked documents.
    Returns:
        (Q,) float32, 0 when no relevant document is in the top k.
    """
    _check_k(k, gains.shape[1], "mrr")
    rel = gains[:, :k] > 0
    first = rel.to(torch.int8).argmax(1)  # first True (argmax returns the first maximum)
    rr = 1.0 / (first.to(torch.float32) + 1.0)
    return torch.where(rel.any(1), rr, torch.zeros_like(rr))


def ndcg_at_k(gains: Tensor, ideal_gains: Tensor, k: int) -> Tensor:
    """Per-query nDCG@k with linear gain, as trec_eval's ``ndcg_cut``.

    Args:
        gains: (Q, K) grades of the ranked documents.
        ideal_gains: (Q, M) each query's grades sorted descending, 0-padded
            (:meth:`Qrels.ideal_gains`); M >= k or the tail is taken as 0.
    Returns:
        (Q,) float32, 0 where the ideal DCG is 0.
    """
    _check_k(k, gains.shape[1], "ndcg")
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    dcg = (gains[:, :k].clamp(min=0).double() * discount).sum(1)
    ideal = ideal_gains[:, :k].double()
    idcg = (ideal * discount[: ideal.shape[1]]).sum(1)
    out = torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), torch.zeros_like(dcg))
    return out.to(torch.float32)


def compute_metrics(
    ranking: Tensor,
    qrels: Qrels,
    recall_ks: Iterable[int] = (1, 10, 100),
    mrr_k: int = 10,
    ndcg_k: int = 10,
) -> dict[str, float]:
    """Mean recall@k (for each k), MRR@k and nDCG@k over all queries.

    Args:
        ranking: (Q, K) int64 document indices, best first; K must be at
            least the largest cut-off.
        qrels: judgements for the same Q queries and N documents.
    Returns:
        A flat dict ``{"recall@1": ..., "recall@10": ..., "mrr@10": ...,
        "ndcg@10": ...}`` of floats in [0, 1].
    """
    gains = qrels.gains_of(ranking)
    num_rel = qrels.num_relevant()
    out: dict[str, float] = {}
    for k in sorted(set(recall_ks)):
        out[f"recall@{k}"] = recall_at_k(gains, num_rel, k).mean().item()
    out[f"mrr@{mrr_k}"] = mrr_at_k(gains, mrr_k).mean().item()
    out[f"ndcg@{ndcg_k}"] = ndcg_at_k(gains, qrels.ideal_gains(ndcg_k), ndcg_k).mean().item()
    return out
