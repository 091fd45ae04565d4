"""Retrieval evaluator: recall@k, MRR@10 and nDCG@10 for any text encoder.

The evaluator only needs an encode function, ``encode(texts) -> (n, D)``
tensor, so it judges our models and anyone else's alike. It encodes queries
and corpus in batches (with progress bars), L2-normalises, searches with
:func:`mochi_retrieval.search.search` and scores the ranking with
:mod:`mochi_retrieval.metrics`. Its primary metric is ``ndcg@10``, the number
BEIR tables report.

Example::

    data = load_beir("scifact", split="test")
    ev = RetrievalEvaluator.from_beir(data, recall_ks=(1, 10, 100))
    metrics = ev(model.encode)                 # {"recall@1": ..., "ndcg@10": ...}
    metrics[ev.primary_metric]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from mochi_retrieval.encoders.encoding import EncodeFn, encode_in_batches
from mochi_retrieval.eval.errors import EvalInputError
from mochi_retrieval.metrics import Qrels, compute_metrics, recall_curve
from mochi_retrieval.search import Backend, faiss_num_gpus, search

logger = logging.getLogger(__name__)

@dataclass
class RetrievalResult:
    """``metrics``: the flat dict; ``recall_curve``: (K,) mean recall@k for k = 1..K."""

    metrics: dict[str, float]
    recall_curve: Tensor


class RetrievalEvaluator:
    """Scores an encoder on one retrieval split.

    Args:
        queries: Q query texts.
        corpus: N document texts.
        qrels: judgements over those Q queries and N documents.
        recall_ks: cut-offs for recall@k.
        mrr_k, ndcg_k: cut-offs for MRR and nDCG (10 as in MS MARCO / BEIR).
        batch_size: texts per ``encode`` call.
        backend: search backend (see :func:`mochi_retrieval.search.search`);
            "auto" with an accelerator ``device`` and a faiss without GPU
            support searches with torch on that device.
        device: where the torch backend searches (default: the CPU).
        show_progress: tqdm bars while encoding.
    Raises:
        EvalInputError: a cut-off is larger than the corpus.
    """

    primary_metric = "ndcg@10"

    def __init__(
        self,
        queries: Sequence[str],
        corpus: Sequence[str],
        qrels: Qrels,
        recall_ks: Sequence[int] = (1, 10, 100),
        mrr_k: int = 10,
        ndcg_k: int = 10,
        batch_size: int = 64,
        backend: Backend = "auto",
        device: torch.device | str = "cpu",
        show_progress: bool = True,
    ) -> None:
        self.queries, self.corpus, self.qrels = list(queries), list(corpus), qrels
        self.recall_ks = sorted(set(int(k) for k in recall_ks))
        self.mrr_k, self.ndcg_k = mrr_k, ndcg_k
        self.primary_metric = f"ndcg@{ndcg_k}"
        self.batch_size, self.backend, self.show_progress = batch_size, backend, show_progress
        self.device = torch.device(device)
        if backend == "auto" and self.device.type != "cpu" and faiss_num_gpus() == 0:
            self.backend = "torch"
        self.max_k = max([*self.recall_ks, mrr_k, ndcg_k])
        if min([*self.recall_ks, mrr_k, ndcg_k]) < 1:
            raise EvalInputError(f"cut-offs must be >= 1, got recall@k {self.recall_ks}, mrr@{mrr_k}, ndcg@{ndcg_k}")
        if self.max_k > len(self.corpus):
            raise EvalInputError(f"k={self.max_k} is larger than the corpus ({len(self.corpus)} documents); "
                                 "choose smaller --recall@k values")

    @classmethod
    def from_beir(cls, data, **kwargs) -> "RetrievalEvaluator":
        """Build from a :class:`mochi_retrieval.data.beir.BeirData`."""
        return cls(data.query_texts, data.doc_texts, data.qrels_tensor(), **kwargs)

    def evaluate_embeddings(self, query_emb: Tensor, corpus_emb: Tensor) -> RetrievalResult:
        """Search and score precomputed embeddings.

        Args:
            query_emb: (Q, D) L2-normalised query embeddings.
            corpus_emb: (N, D) L2-normalised document embeddings.
        """
        _, ranking = search(query_emb, corpus_emb, self.max_k, backend=self.backend, device=self.device)
        ranking = ranking.cpu()
        metrics = compute_metrics(ranking, self.qrels, self.recall_ks, self.mrr_k, self.ndcg_k)
        curve = recall_curve(self.qrels.gains_of(ranking), self.qrels.num_relevant())
        return RetrievalResult(metrics, curve)

    def evaluate(self, encode: EncodeFn) -> RetrievalResult:
        """Encode queries and corpus with ``encode``, then search and score."""
        q = encode_in_batches(encode, self.queries, self.batch_size, "queries", self.show_progress)
        c = encode_in_batches(encode, self.corpus, self.batch_size, "corpus", self.show_progress)
        if q.shape[1] != c.shape[1]:
            raise EvalInputError(f"query and document embeddings differ in size: {q.shape[1]} vs {c.shape[1]}")
        return self.evaluate_embeddings(q, c)

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        """Flat metrics dict, e.g. ``{"recall@1": .., "recall@10": .., "mrr@10": .., "ndcg@10": ..}``."""
        result = self.evaluate(encode)
        logger.info("retrieval: %s", ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
        return result.metrics
