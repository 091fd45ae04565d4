"""Contrastive text retrieval: in-batch documents, mined documents, a MoCo queue and a FAISS bank, with MoCHi.

The text adapter of the contrastive core (:class:`~mochi_retrieval.core.ContrastiveCore`). One call of
:meth:`TextMoCo.forward` is one training step's maths. Per query the negatives are the union of four
sources, in this order (each may be off):

- **in-batch**: every other document of the global batch (and any hard
  negatives the pairs carry), as in ``MultipleNegativesRankingLoss``; with
  gradient in the shared mode;
- **mined**: the bank's top-n documents per query, re-encoded by the network
  with gradient (ANCE / DPR, or sentence-transformers' triplets) and shared
  across the batch like in-batch documents;
- **queue**: the keys of recent batches (detached), a :class:`MomentumQueue`;
- **bank**: the next c documents by similarity to the query from a
  :class:`FaissNegativeBank` refreshed every R steps, as stored vectors (detached).

MoCHi's hard pool is taken from that union. False negatives are masked in
every source: the query's own positives and anything whose tokenised input
equals one of theirs; an entry present in several sources counts once.

Gradient balance (shared mode): with ``gradient="query_only"`` (the default) the detached sources
score the query only, and the gradient-carrying sources alone score the documents, which is
``MultipleNegativesRankingLoss``'s document gradient (the core's module docstring has the reasoning).
``"joint"`` keeps one softmax over everything (for comparison). Key encoder ``"momentum"`` (MoCo)
gives documents no gradient at all.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .bank import BankCorpus, BankSettings, BankSource, RefreshPolicy
from .bank import cache as bank_cache
from .bank.refresh import shard
from .core import ContrastiveCore, Gradient, MoCoConfig
from .encoders import encode_in_batches, encoder_output_dim, eval_mode, make_momentum_copy
from .grad_cache import GradCache
from .loss import ContrastiveOutput, MoCHiConfig
from .monitors import family_share, mean_pairwise_cosine, source_mass
from .negatives import NO_ID, Query, Source, false_negative_mask

logger = logging.getLogger(__name__)

TokenBatch = Mapping[str, Tensor]


class TextMoCo(ContrastiveCore):
    """Text retrieval model: queries and documents through one encoder (or a momentum copy).

    Args:
        encoder: token batch -> (B, D) pooled embeddings; exposes ``output_dim``
            and ``tokenize(texts)`` (e.g. :class:`HFTextEncoder`).
        doc_groups: (N_docs,) group of every doc id (equal = the same input after
            tokenisation and truncation); ids index it.
        key_encoder: "shared" or "momentum".
        queue_size: K; 0 disables the queue.
        momentum: EMA coefficient of the momentum key encoder.
        momentum_schedule: "constant" or "cosine" (towards 1 over ``total_steps``).
        temperature: T (text models usually want about 0.05).
        in_batch_negatives: use the batch's other documents as negatives.
        mochi: MoCHi settings, or None.
        bank: bank settings, or None for no bank.
        bank_corpus: the documents the bank indexes (needed with ``bank``).
        max_neg_pos_ratio: mask every negative (any source) scoring above this
            share of the query's positive score, q.n > r * q.k: a positive-aware
            filter against near-duplicate false negatives (TopK-PercPos of
            NV-Retriever, Moreira et al. 2024, with the model as its own teacher).
        gradient: "query_only" (detached sources score the query only; see the
            module docstring) or "joint" (one softmax over every source).
        doc_families: (N_docs,) family of every doc id (e.g. its first paragraph),
            for ``bank.exclude_family`` and the false-negative monitor; None = groups.
        token_groups: tokenised input (tuple of token ids) -> group, to mask given
            negatives (which have no doc id) like the rest.
        grad_cache_chunk: encode in chunks of this many texts with GradCache (same
            gradient, memory of one chunk); None = one pass.
        seed: seeds the MoCHi draws of step t as (seed, t, rank).
        steps_per_update: forward calls per optimiser step (gradient accumulation): the bank's schedule
            (initial pass, full and rolling refreshes, staleness) counts optimiser steps.

    The bank is kept fresh by :meth:`maintain_bank`, which :meth:`forward` calls at the first forward call of
    each optimiser step: the initial pass over ``bank_corpus`` when the bank is empty, a full refresh every
    ``bank.refresh_every`` steps, otherwise a rolling slice of ceil(N / ``bank.max_staleness``) rows.
    """

    def __init__(
        self,
        encoder: nn.Module,
        doc_groups: Tensor,
        *,
        key_encoder: Literal["shared", "momentum"] = "shared",
        queue_size: int = 4096,
        momentum: float = 0.999,
        momentum_schedule: str = "constant",
        total_steps: int | None = None,
        temperature: float = 0.05,
        in_batch_negatives: bool = True,
        mochi: MoCHiConfig | None = None,
        bank: BankSettings | None = None,
        bank_corpus: BankCorpus | None = None,
        max_neg_pos_ratio: float | None = None,
        gradient: Gradient = "query_only",
        doc_families: Tensor | None = None,
        token_groups: Mapping[tuple[int, ...], int] | None = None,
        grad_cache_chunk: int | None = None,
        seed: int = 0,
        steps_per_update: int = 1,
    ) -> None:
        if key_encoder not in ("shared", "momentum"):
            raise ValueError(f"key_encoder must be 'shared' or 'momentum', got {key_encoder!r}")
        if not (in_batch_negatives or queue_size > 0 or bank is not None):
            raise ValueError("no negatives: enable in-batch negatives, the queue (queue_size > 0) or the bank")
        if bank is not None and bank_corpus is None:
            raise ValueError("a bank needs bank_corpus (the documents it indexes)")
        if steps_per_update < 1:
            raise ValueError(f"steps_per_update must be >= 1, got {steps_per_update}")
        if grad_cache_chunk is not None and grad_cache_chunk < 1:
            raise ValueError(f"grad_cache_chunk must be >= 1 or None, got {grad_cache_chunk}")
        settings = MoCoConfig(queue_size=queue_size, momentum=momentum, momentum_schedule=momentum_schedule,
                              temperature=temperature, in_batch_negatives=in_batch_negatives,
                              max_neg_pos_ratio=max_neg_pos_ratio, gradient=gradient)
        super().__init__(settings, total_steps=total_steps, mochi=mochi, seed=seed)
        dim = encoder_output_dim(encoder)
        self.query_encoder = encoder
        self.key_encoder = make_momentum_copy(encoder) if key_encoder == "momentum" else None
        self.shared = key_encoder == "shared"
        self._init_negatives(queue_size, dim, bank, 0 if bank_corpus is None else len(bank_corpus.texts))
        self.replicate_bank = True
        if bank is not None:
            # One search per step: the first n candidates are re-encoded (mined), the next c are stored vectors.
            # The positive-aware ceilings (bank.max_pos_ratio, and max_neg_pos_ratio, so that no mined document
            # is re-encoded only to be masked) apply to it; a query may be left short of n + c (-1 slots).
            ratios = [r for r in (bank.max_pos_ratio, max_neg_pos_ratio) if r is not None]
            self._use_bank(BankSource(self.bank, bank, groups=self._groups_of, exclusion_groups=self._bank_exclusion,
                                      pos_ratio=min(ratios) if ratios else None, allow_fewer=True))
        groups = doc_groups.detach().to(torch.long).reshape(-1).clone()
        self.register_buffer("doc_groups", groups)
        families = groups if doc_families is None else doc_families.detach().to(torch.long).reshape(-1).clone()
        if families.shape != groups.shape:
            raise ValueError(f"doc_families has {families.numel()} entries for {groups.numel()} documents")
        self.register_buffer("doc_families", families)
        self.token_groups = dict(token_groups or {})
        self.in_batch, self.grad_cache_chunk = in_batch_negatives, grad_cache_chunk
        self.max_neg_pos_ratio = max_neg_pos_ratio
        self.bank_corpus = bank_corpus
        self._text_of = dict(zip(bank_corpus.ids.tolist(), bank_corpus.texts)) if bank_corpus is not None else {}
        self.refresh_policy = None if bank is None else RefreshPolicy(len(bank_corpus), bank.refresh_every,
                                                                        bank.max_staleness)
        self.steps_per_update = steps_per_update
        self.refresh_log: list[dict[str, float]] = []  # the initial pass and the full refreshes
        self.bank_seconds = {"initial": 0.0, "full": 0.0, "rolling": 0.0}  # encoding for the bank, by kind
        self._maintained: int | None = None  # the optimiser step the bank was last brought up to date for
        self._clock: float | None = None  # wall clock at the end of the initial pass (encode-share monitor)

    # ------------------------------------------------------------------ encoders
    @property
    def encoder(self) -> nn.Module:
        """The query encoder: what evaluation and export use."""
        return self.query_encoder

    def _key_net(self) -> nn.Module:
        return self.query_encoder if self.shared else self.key_encoder

    def _docs(self, tokens: TokenBatch, cache: GradCache) -> Tensor:
        """(n, D) unit document embeddings; with gradient in the shared mode."""
        if self.shared:
            return cache.embed(self.query_encoder, tokens)
        with torch.no_grad():
            return F.normalize(self.key_encoder(tokens).float(), dim=1)

    # ------------------------------------------------------------------ bank
    def bank_due(self, step: int | None) -> bool:
        """Whether optimiser step ``step`` starts with the initial pass or a full refresh."""
        if self.bank is None:
            return False
        if len(self.bank) == 0:
            return True
        return step is not None and self.refresh_policy.full_due(step)

    def maintain_bank(self, step: int | None) -> float:
        """Bring the bank up to date before optimiser step ``step`` (once per step): the initial pass when it
        is empty, a full refresh when due, else this step's rolling slice. Returns the seconds it took."""
        if self.bank is None or (step is not None and self._maintained == step):
            return 0.0
        self._maintained = step
        if self._clock is None and len(self.bank):  # a bank restored from a checkpoint: the share starts here
            self._clock = time.perf_counter()
        if self.bank_due(step):
            return self.refresh_bank(step)
        if step is None:
            return 0.0
        rows = self.refresh_policy.rolling_rows(step)
        return self._refresh_rows(rows, step) if rows.numel() else 0.0

    @torch.no_grad()
    def refresh_bank(self, step: int | None = None, progress: bool = False) -> float:
        """Re-embed all of the bank's documents with the key encoder (eval mode); returns the seconds it took.

        Each process embeds a 1/W slice and the slices are gathered, so every process holds the same bank;
        with ``bank.shard`` each process embeds and keeps only the rows it holds (rows ``rank::W``).
        """
        start = time.perf_counter()
        kind = "initial" if len(self.bank) == 0 else "full"
        world, rank = self.bank.layout()
        texts = list(self.bank_corpus.texts)
        held = list(range(rank, len(texts), world))  # every row unsharded
        cached, key = None, None
        if kind == "initial" and self.bank_settings.cache_dir:
            key = bank_cache.cache_key(self._key_net(), texts, self._encoding_settings())
            key = key if world == 1 else f"{key}-shard{rank}of{world}"
            cached = bank_cache.load(self.bank_settings.cache_dir, key, len(held))
        emb = cached if cached is not None else self._embed(
            [texts[i] for i in held], progress=progress or len(texts) > 10_000,  # a long pass, initial or full
            desc=f"bank {kind} pass", gather=world == 1)
        if key is not None and cached is None and (world > 1 or distributed.rank() == 0):
            bank_cache.save(self.bank_settings.cache_dir, key, emb)
        table = self.doc_families if self.bank_settings.exclude_family else self.doc_groups
        ids = self.bank_corpus.ids
        self.bank.refresh(emb, ids=ids, text_group=table.cpu()[ids], step=-1 if step is None else step)
        seconds = time.perf_counter() - start
        self.bank_seconds[kind] += seconds
        self.refresh_log.append({"step": -1 if step is None else step, "seconds": seconds, "documents": len(texts),
                                 "kind": kind, "cached": cached is not None})
        logger.info("bank %s pass at step %s: %d documents in %.1f s (%.0f documents/s)", kind, step, len(texts),
                    seconds, len(texts) / max(seconds, 1e-9))
        if kind == "initial":
            self._clock = time.perf_counter()
        return seconds

    def _encoding_settings(self) -> dict:
        """What besides the weights and texts decides the embeddings (the initial pass's cache key)."""
        enc = self.query_encoder
        return {"encoder": type(enc).__name__, "max_length": getattr(enc, "max_length", None),
                "pooling": getattr(enc, "pooling", None), "batch": self.bank_settings.encode_batch_size}

    @torch.no_grad()
    def _refresh_rows(self, rows: Tensor, step: int) -> float:
        """Re-embed the bank rows ``rows`` (m,) (a rolling slice), written at ``step``; a sharded bank's
        process re-embeds those it holds."""
        start = time.perf_counter()
        world, rank = self.bank.layout()
        if world > 1:
            rows = rows[rows % world == rank]
        texts = [self.bank_corpus.texts[r] for r in rows.tolist()]
        emb = self._embed(texts, progress=False, desc="bank rolling refresh", gather=world == 1)
        self.bank.update(self.bank_corpus.ids[rows], emb, step=step, measure_drift=True)
        seconds = time.perf_counter() - start
        self.bank_seconds["rolling"] += seconds
        return seconds

    def _embed(self, texts: list[str], progress: bool, desc: str, gather: bool = True) -> Tensor:
        """(len(texts), D) unit embeddings by the key network in eval mode, each process embedding its share
        (possibly none) and the shares gathered in rank order; ``gather=False``: this process embeds all of
        ``texts`` (a shard's own rows)."""
        net = self._key_net()
        device = self.doc_groups.device
        tokenize = self.query_encoder.tokenize
        index = torch.arange(len(texts))
        if gather:
            index = shard(index, distributed.world_size(), distributed.rank())
        mine = [texts[i] for i in index.tolist()]
        emb = torch.empty(0, encoder_output_dim(self.query_encoder))
        if mine:
            with eval_mode(net):
                emb = encode_in_batches(
                    lambda batch: net({k: v.to(device) for k, v in tokenize(batch).items()}).float(),
                    mine, self.bank_settings.encode_batch_size, desc, progress and distributed.rank() == 0)
        return distributed.all_gather_cat(emb.to(device)) if gather else emb.to(device)

    @torch.no_grad()
    def _bank_monitors(self, step: int | None) -> dict[str, Tensor]:
        """Staleness (in optimiser steps) of the rows served this step against the mean age of all rows, and
        the share of wall time spent encoding for the bank since the initial pass."""
        if self.bank is None or step is None or getattr(self.bank, "last_rows", None) is None:
            return {}
        age = self.bank.staleness(step)
        age = age[~age.isnan()]
        stats: dict[str, Tensor] = {}
        if age.numel():
            stats.update(bank_staleness_mean=age.mean(), bank_staleness_max=age.max())
        shift = self.bank.last_drift_shift
        if shift is not None and (self.bank.last_rows >= 0).any():  # the drift correction's score lift
            stats["bank_drift_shift"] = shift[self.bank.last_rows >= 0].mean()
        age_mean = self.bank.mean_age(step)
        if age_mean is not None:  # the whole bank's mean age: served rows younger than this are favoured by drift
            stats["bank_age_mean"] = age_mean
        if self.bank.last_recall is not None:
            stats["bank_index_recall"] = torch.tensor(self.bank.last_recall)
        if self._clock is not None:
            wall = time.perf_counter() - self._clock
            spent = self.bank_seconds["full"] + self.bank_seconds["rolling"]
            stats["bank_encode_share"] = torch.tensor(spent / wall if wall > 0 else 0.0)
        return stats

    # ------------------------------------------------------------------ step
    def _lookup(self, table: Tensor, ids: Tensor) -> Tensor:
        """Rows of a per-doc table at doc ids (any shape), -1 where the id is -1."""
        ids = ids.to(table.device)
        return torch.where(ids >= 0, table[ids.clamp(min=0)], NO_ID)

    def _bank_exclusion(self, ids: Tensor) -> Tensor:
        """Groups the bank excludes for doc ids (B, E): families under ``bank.exclude_family``, else groups."""
        return self._lookup(self.doc_families if self.bank_settings.exclude_family else self.doc_groups, ids)

    def _groups_of(self, ids: Tensor) -> Tensor:
        """Groups of doc ids (any shape), -1 where the id is -1."""
        return self._lookup(self.doc_groups, ids)

    def _groups_of_tokens(self, tokens: TokenBatch) -> Tensor:
        """(n,) group of each tokenised text (given negatives), -1 when it matches no document."""
        ids, mask = tokens["input_ids"].cpu(), tokens["attention_mask"].cpu().bool()
        keys = [tuple(row[m].tolist()) for row, m in zip(ids, mask)]
        return torch.tensor([self.token_groups.get(k, NO_ID) for k in keys], dtype=torch.long,
                            device=self.doc_groups.device)

    def forward(
        self,
        query: TokenBatch,
        positive: TokenBatch,
        ids: Tensor,
        exclude: Tensor | None = None,
        negatives: TokenBatch | None = None,
        *,
        epoch: float = math.inf,
        step: int | None = None,
    ) -> dict[str, Tensor]:
        """One step.

        Args:
            query, positive: token batches, each tensor (B, L).
            ids: (B,) doc id of each positive.
            exclude: (B, E) every doc id that is a positive for the query
                (its own included), -1 padded; default ``ids``.
            negatives: optional token batch (B*n, L) of given hard negatives.
            epoch: fractional epoch, for the MoCHi warm-up.
            step: forward-call index, for bank refreshes, the momentum
                schedule and reproducible MoCHi draws.
        Returns:
            ``loss``, ``accuracy`` (proxy top-1 over real negatives), ``q``,
            ``k`` (B, D) detached, ``pos_logits`` (B,), ``neg_logits`` (B, M),
            ``monitors`` (a dict of scalar tensors: softmax mass per source,
            mean doc-doc cosine of the batch, false-negative share of the hard pool).
        """
        update = None if step is None else step // self.steps_per_update
        if step is None or step % self.steps_per_update == 0:
            self.maintain_bank(update)
        if self.bank_source is not None:
            self.bank_source.stamp = -1 if update is None else update
        cache = GradCache(self.grad_cache_chunk)
        exclude = ids.view(-1, 1) if exclude is None else exclude
        exclude_groups = self._groups_of(exclude)
        q = cache.embed(self.query_encoder, query)
        diverged = self._diverged(q)
        if diverged is not None:
            return diverged
        if not self.shared:
            self._momentum_step(self.query_encoder, self.key_encoder, step)
        k = self._docs(positive, cache)
        sources = self._sources(q, k, ids, exclude, exclude_groups, negatives, cache)
        out, loss = self.contrastive_step(q, k, sources, ids=ids, groups=self._groups_of(ids), epoch=epoch,
                                          step=step, documents_grad=self.shared,
                                          max_neg_pos_ratio=self.max_neg_pos_ratio)
        loss = cache.attach(loss)
        self._write_back_mined(sources)
        monitors = self._monitors(out, k.detach(), ids, sources)
        monitors.update(self._bank_monitors(update))
        return {"loss": loss, "accuracy": out.accuracy, "q": q.detach(), "k": k.detach(),
                "pos_logits": out.pos_logits.detach(), "neg_logits": out.neg_logits.detach(), "monitors": monitors}

    # ------------------------------------------------------------------ sources
    def _sources(self, q: Tensor, k: Tensor, ids: Tensor, exclude: Tensor, exclude_groups: Tensor,
                 negatives: TokenBatch | None, cache: GradCache) -> list[Source]:
        device = q.device
        sources: list[Source] = []

        def shared(name: str, vectors: Tensor, entry_ids: Tensor, groups: Tensor, grad: bool) -> None:
            mask = false_negative_mask(entry_ids, groups, exclude, exclude_groups)
            sources.append(Source(name, vectors, entry_ids, groups, grad, mask))

        if self.in_batch:
            keys, key_ids, key_groups = self._in_batch(k, ids, negatives, cache)
            shared("in_batch", keys, key_ids, key_groups, self.shared)
        query = Query(q.detach(), exclude, exclude_groups, ids=ids, k=k.detach())
        mined_ids = None if self.bank_source is None else self.bank_source.mine(query)  # the step's one search
        if mined_ids is not None:
            flat = mined_ids.reshape(-1)
            texts = [self.bank_corpus_text(int(i)) for i in flat.tolist()]
            tokens = {key: v.to(device) for key, v in self.query_encoder.tokenize(texts).items()}
            vecs = self._gather(self._docs(tokens, cache))
            flat = distributed.all_gather_cat(flat.to(device))
            shared("mined", vecs, flat, self._groups_of(flat), self.shared)
        return sources + self._memory_sources(query)  # the queue, then the bank's stored vectors (same search)

    @torch.no_grad()
    def _write_back_mined(self, sources: list[Source]) -> None:
        """With ``bank.update_with_mined``: the mined documents' fresh embeddings (every process's, the same on
        each) replace their bank rows."""
        if self.bank is None or not self.bank_settings.update_with_mined:
            return
        for s in sources:
            if s.name == "mined":
                self.bank_source.write(s.ids, s.vectors)

    def bank_corpus_text(self, doc_id: int) -> str:
        """The (prefixed) text of a bank document by doc id."""
        return self._text_of[doc_id]

    def _gather(self, keys: Tensor) -> Tensor:
        """Keys of every process; differentiable across processes when they carry gradient."""
        if distributed.world_size() == 1:
            return keys
        return distributed.all_gather_with_grad(keys) if keys.requires_grad else distributed.all_gather_cat(keys)

    def _in_batch(self, k: Tensor, ids: Tensor, negatives: TokenBatch | None,
                  cache: GradCache) -> tuple[Tensor, Tensor, Tensor]:
        """Keys of the global batch (and given negatives), their doc ids and groups."""
        keys, key_ids, groups = k, ids, self._groups_of(ids)
        if negatives is not None:  # given hard negatives: no doc id; groups from their tokens
            hard = self._docs(negatives, cache)
            keys = torch.cat([k, hard])
            key_ids = torch.cat([ids, torch.full((hard.shape[0],), NO_ID, dtype=torch.long, device=ids.device)])
            groups = torch.cat([groups, self._groups_of_tokens(negatives).to(groups.device)])
        return self._gather(keys), distributed.all_gather_cat(key_ids), distributed.all_gather_cat(groups)

    # ------------------------------------------------------------------ monitors
    @torch.no_grad()
    def _monitors(self, out: ContrastiveOutput, k: Tensor, ids: Tensor, sources: list[Source]) -> dict[str, Tensor]:
        b = k.shape[0]
        widths = {s.name: s.width for s in sources}
        stats = source_mass(out.pos_logits, out.neg_logits, out.synthetic_logits, widths, self.temperature)
        negative_mass = 1.0 - stats["mass_positive"]
        grad_mass = sum((stats[f"mass_{s.name}"] for s in sources if s.grad), torch.zeros((), device=k.device))
        stats["grad_mass_share"] = grad_mass / negative_mass.clamp(min=1e-12)
        stats["doc_cosine"] = mean_pairwise_cosine(k)
        families = torch.cat([s.per_query(self._lookup(self.doc_families, s.ids), b) for s in sources], dim=1)
        stats["false_neg_family_top16"] = family_share(out.neg_logits, families.to(out.neg_logits.device),
                                                        self._lookup(self.doc_families, ids).to(k.device), 16)
        return stats
