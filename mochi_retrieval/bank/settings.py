"""The bank's settings (the ``bank`` section of a training config), each checked once, here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import require


@dataclass(frozen=True)
class BankSettings:
    """FAISS negative bank settings.

    Attributes:
        candidates: c, detached negatives per query (stored vectors, no gradient).
        mined_negatives: n, negatives per query whose texts are re-encoded with
            gradient (text models; taken before the c detached ones).
        corpus: text: the documents the bank holds. "pairs" = the training pairs'
            positives; "all" = every document of the data set's corpus (BEIR
            ``corpus.jsonl``); or the path of a documents file (BEIR
            ``corpus.jsonl`` layout, or one text per line of a ``.jsonl``/``.tsv``/``.txt``).
        include_eval_documents: text: keep the documents judged in ``eval.split`` in
            the bank (by default they stay out, so a run never trains against the
            documents it is scored on).
        exclude_family: exclude candidates from the family of a positive (text:
            same first paragraph), not only identical inputs.
        max_pos_ratio: text: skip candidates scoring above this share of the
            query's positive score, q.d > r * q.k (sentence-transformers'
            ``relative_margin`` is 1 - r); None = no relative ceiling.
        refresh_every: re-embed the whole bank every R optimiser steps (0 = only
            at the start of a run; text models only: an image bank starts random
            and is kept by updates).
        max_staleness: text: rolling refresh: re-embed a slice of ceil(N / S) rows
            every optimiser step, cycling through the bank, so that no row is more
            than S steps old; 0 = off. Its cost per step is flat in S, not in N.
        drift_correction: text, with the rolling refresh: rank and serve each row as its estimated fresh
            embedding ``normalise(e + m(now) - m(stamp))``, where m is the mean move of the embedding space measured on
            the rows each rolling slice re-embeds (:mod:`mochi_retrieval.bank.drift`); without it, stale rows
            score low and mining favours the rows refreshed last.
        update_with_keys: write each batch's document keys into the bank.
        update_with_mined: text: write the re-encoded mined negatives' embeddings
            (computed by the step anyway) into the bank.
        skip_top: drop the first r candidates per query (rank window).
        max_similarity: drop candidates scoring above this (likely false negatives).
        backend: "faiss" (a flat inner-product FAISS index) or "torch" (exact ``q @ E.T``, the test oracle);
            both return the same candidates, ties aside.
        device: where the bank searches: "auto" (the GPU when faiss-gpu, or torch for the torch backend,
            sees one, else the CPU), "cpu", or "cuda" (the CPU with a warning when no GPU is usable).
        encode_batch_size: documents per forward pass during a refresh.
        shard: text: under W processes each holds only its 1/W of the rows (rows ``rank::W``: embeddings,
            stamps and index) and a step's search merges the shards' top lists, so every process gets the
            candidates one process holding the whole bank would; false = every process holds the whole bank.
            Checkpoints then hold one file of rows per process (resume with as many processes).
        index: a FAISS ``index_factory`` string: "Flat" (exact), "SQfp16" (float16 codes), "HNSW32",
            "IVF1024,Flat", "IVF1024,PQ32", ...; trained on the refreshed rows (of each shard). Needs
            backend="faiss" unless "Flat".
        search_params: the index's search settings as a ``faiss.ParameterSpace`` string, e.g. "nprobe=64"
            (IVF) or "efSearch=128" (HNSW); null = FAISS's defaults.
        rerank: F > 1 with an approximate ``index``: the index shortlists F times the rows a search needs and
            their exact scores (from the rows) order them, so the codes only have to find the neighbours, not
            rank them: recall close to the lists' own at the memory of the codes (with ``rows_dir``); 1 = off.
        rows_dir: a folder where the bank keeps its rows in a memory-mapped file (unlinked: nothing is left
            there after the run) instead of the process's memory; with a code ``index`` and ``rerank`` a
            search reads only the shortlisted rows from it. null = rows in memory.
        recall_queries: at each refresh, measure the share of the exact top (candidates + mined_negatives)
            that the index returns on this many of the bank's own rows (monitor ``bank_index_recall``; exact
            indexes report 1); 0 = off.
        cache_dir: text: a folder for the initial pass's embeddings, keyed by the key network's weights, the
            documents and the encoding settings: a later run with the same ones loads them instead of
            encoding the corpus again; null = no cache.
    """

    candidates: int = 16
    refresh_every: int = 0
    update_with_keys: bool = True
    skip_top: int = 0
    max_similarity: float | None = None
    backend: Literal["faiss", "torch"] = "faiss"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    encode_batch_size: int = 128
    mined_negatives: int = 0
    exclude_family: bool = False
    max_pos_ratio: float | None = None
    corpus: str = "pairs"
    include_eval_documents: bool = False
    max_staleness: int = 0
    drift_correction: bool = False
    update_with_mined: bool = False
    cache_dir: str | None = None
    shard: bool = False
    index: str = "Flat"
    search_params: str | None = None
    rerank: int = 1
    rows_dir: str | None = None
    recall_queries: int = 64

    def __post_init__(self) -> None:
        require(self.candidates >= 0, "candidates", ">= 0", self.candidates)
        require(self.mined_negatives >= 0, "mined_negatives", ">= 0", self.mined_negatives)
        require(self.max_pos_ratio is None or self.max_pos_ratio > 0, "max_pos_ratio", "> 0 or null",
                self.max_pos_ratio)
        require(self.candidates + self.mined_negatives >= 1, "candidates",
                ">= 1 unless mined_negatives > 0", self.candidates)
        require(self.refresh_every >= 0, "refresh_every", ">= 0", self.refresh_every)
        require(self.max_staleness >= 0, "max_staleness", ">= 0 (0 = no rolling refresh)", self.max_staleness)
        require(self.skip_top >= 0, "skip_top", ">= 0", self.skip_top)
        require(self.encode_batch_size >= 1, "encode_batch_size", ">= 1", self.encode_batch_size)
        require(self.max_similarity is None or -1.0 <= self.max_similarity <= 1.0, "max_similarity",
                "in [-1, 1] or null", self.max_similarity)
        require(isinstance(self.rerank, int) and self.rerank >= 1, "rerank", "an int >= 1 (1 = off)", self.rerank)
        require(self.rerank == 1 or self.index != "Flat", "rerank",
                "1 with bank.index='Flat' (its scores are exact already); re-ranking orders a code index's shortlist",
                self.rerank)
        require(self.rows_dir is None or (isinstance(self.rows_dir, str) and bool(self.rows_dir.strip())),
                "rows_dir", "a folder path or null", self.rows_dir)
        require(self.rows_dir is None or self.backend == "faiss", "rows_dir",
                "null with backend='torch' (the exact oracle keeps its rows where it searches them)", self.rows_dir)
        require(self.recall_queries >= 0, "recall_queries", ">= 0 (0 = off)", self.recall_queries)
        require(self.backend == "faiss" or self.index == "Flat", "index",
                "'Flat' with backend='torch' (the exact oracle); other index types need backend='faiss'", self.index)
        if self.index != "Flat" or self.search_params:
            from .index import check_index_spec

            check_index_spec(self.index, self.search_params)
        require(not self.drift_correction or (self.index == "Flat" and not self.shard), "drift_correction",
                "false with an approximate bank.index or bank.shard=true (every row's estimate moves with each "
                "measurement: only the exact, unsharded index is rebuilt cheaply)", self.drift_correction)
        require(isinstance(self.corpus, str) and bool(self.corpus.strip()), "corpus",
                "'pairs', 'all' or the path of a documents file", self.corpus)
