"""Contrastive text retrieval: in-batch documents, a MoCo queue and a FAISS bank, with MoCHi.

One call of :meth:`TextMoCo.forward` is one training step's maths. Per query
the negatives are the union of three sources (each may be switched off):

- **in-batch**: every other document of the global batch (and any hard
  negatives the pairs carry), as in ``MultipleNegativesRankingLoss``; in the
  shared mode they carry gradient;
- **queue**: the keys of recent batches (detached), a :class:`MomentumQueue`;
- **bank**: the top-c documents of the training corpus by similarity to the
  query, from a :class:`FaissNegativeBank` refreshed every R steps (ANCE) and
  patched with each batch's keys in between.

MoCHi's hard pool is taken from that union. False negatives are masked in
every source: the query's own positive documents (every document its query
text is paired with) and documents whose text equals one of theirs.

Key encoder: ``"shared"`` encodes documents with the query network itself
(with gradient, like sentence-transformers' in-batch losses; the queue holds
detached document embeddings), ``"momentum"`` with an EMA copy (MoCo).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .bank import BankSettings, FaissNegativeBank
from .encoders import cosine_momentum, encoder_output_dim, make_momentum_copy, momentum_update
from .loss import MoCHiConfig, contrastive_loss, negative_logits
from .queue import NO_ID, MomentumQueue

logger = logging.getLogger(__name__)

TokenBatch = Mapping[str, Tensor]


@dataclass
class BankCorpus:
    """The documents a bank indexes: ids (N,) in the doc-id space and their (prefixed) texts."""

    ids: Tensor
    texts: Sequence[str]

    def __post_init__(self) -> None:
        if len(self.texts) != self.ids.numel() or not len(self.texts):
            raise ValueError(f"bank corpus: {self.ids.numel()} ids for {len(self.texts)} texts")


def pad_rows(rows: Sequence[Sequence[int]], fill: int = NO_ID) -> Tensor:
    """Ragged int rows -> (n, max_len) long tensor padded with ``fill``."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def false_negative_mask(entry_ids: Tensor, entry_groups: Tensor, exclude: Tensor, exclude_groups: Tensor) -> Tensor:
    """(B, M) True where entry m is a false negative for query b.

    Args:
        entry_ids, entry_groups: (M,) doc id and text group of each entry (-1 = unknown, never masked).
        exclude, exclude_groups: (B, E) the query's positive doc ids and their groups, -1 padded.
    """
    same_id = (entry_ids.view(1, -1, 1) == exclude.unsqueeze(1)) & (entry_ids.view(1, -1, 1) != NO_ID)
    same_group = (entry_groups.view(1, -1, 1) == exclude_groups.unsqueeze(1)) & (entry_groups.view(1, -1, 1) != NO_ID)
    return (same_id | same_group).any(dim=2)


class TextMoCo(nn.Module):
    """Text retrieval model: queries and documents through one encoder (or a momentum copy).

    Args:
        encoder: token batch -> (B, D) pooled embeddings; exposes ``output_dim``
            and ``tokenize(texts)`` (e.g. :class:`HFTextEncoder`).
        doc_groups: (N_docs,) text group of every doc id (equal = identical
            text); ids index it.
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
        seed: seeds the MoCHi draws of step t as (seed, t, rank).
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
        seed: int = 0,
    ) -> None:
        super().__init__()
        if key_encoder not in ("shared", "momentum"):
            raise ValueError(f"key_encoder must be 'shared' or 'momentum', got {key_encoder!r}")
        if not (in_batch_negatives or queue_size > 0 or bank is not None):
            raise ValueError("no negatives: enable in-batch negatives, the queue (queue_size > 0) or the bank")
        if bank is not None and bank_corpus is None:
            raise ValueError("a bank needs bank_corpus (the documents it indexes)")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if momentum_schedule not in ("constant", "cosine") or (momentum_schedule == "cosine" and not total_steps):
            raise ValueError(f"momentum_schedule must be 'constant' or 'cosine' (with total_steps), "
                             f"got {momentum_schedule!r}")
        dim = encoder_output_dim(encoder)
        self.query_encoder = encoder
        self.key_encoder = make_momentum_copy(encoder) if key_encoder == "momentum" else None
        self.shared = key_encoder == "shared"
        self.queue = MomentumQueue(queue_size, dim) if queue_size > 0 else None
        self.register_buffer("doc_groups", doc_groups.detach().to(torch.long).reshape(-1).clone())
        self.momentum, self.momentum_schedule, self.total_steps = momentum, momentum_schedule, total_steps
        self.temperature, self.in_batch, self.mochi, self.seed = temperature, in_batch_negatives, mochi, seed
        self.bank_settings, self.bank_corpus = bank, bank_corpus
        self.bank: FaissNegativeBank | None = None
        if bank is not None:
            if bank.candidates + bank.skip_top > len(bank_corpus.texts):
                raise ValueError(f"bank.candidates={bank.candidates} (+ skip_top={bank.skip_top}) is more than "
                                 f"the corpus holds ({len(bank_corpus.texts)} documents)")
            self.bank = FaissNegativeBank(bank.backend, bank.device)
        if max_neg_pos_ratio is not None and max_neg_pos_ratio <= 0:
            raise ValueError(f"max_neg_pos_ratio must be > 0, got {max_neg_pos_ratio}")
        self.max_neg_pos_ratio = max_neg_pos_ratio
        self.refresh_log: list[dict[str, float]] = []
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ encoders
    @property
    def encoder(self) -> nn.Module:
        """The query encoder: what evaluation and export use."""
        return self.query_encoder

    def replicated_state(self) -> dict[str, Tensor]:
        """State every process must hold identically: the queue (and the bank's embeddings)."""
        state = {f"queue.{n}": b for n, b in self.queue.named_buffers()} if self.queue is not None else {}
        if self.bank is not None and len(self.bank):
            state["bank.embeddings"] = self.bank.embeddings
        return state

    def _key_net(self) -> nn.Module:
        return self.query_encoder if self.shared else self.key_encoder

    def _embed(self, net: nn.Module, tokens: TokenBatch) -> Tensor:
        return F.normalize(net(tokens).float(), dim=1)

    def _keys(self, tokens: TokenBatch) -> Tensor:
        """(B, D) unit document keys; with gradient in the shared mode."""
        if self.shared:
            return self._embed(self.query_encoder, tokens)
        with torch.no_grad():
            return self._embed(self.key_encoder, tokens)

    # ------------------------------------------------------------------ bank
    def bank_due(self, step: int | None) -> bool:
        if self.bank is None:
            return False
        if len(self.bank) == 0:
            return True
        r = self.bank_settings.refresh_every
        return r > 0 and step is not None and step > 0 and step % r == 0

    @torch.no_grad()
    def refresh_bank(self, step: int | None = None, progress: bool = False) -> float:
        """Re-embed the bank's documents with the key encoder; returns the seconds it took.

        Each process embeds a 1/W slice and the slices are gathered, so every
        process holds the same bank.
        """
        from .eval.retrieval import encode_in_batches

        start = time.perf_counter()
        net = self._key_net()
        was_training = net.training
        net.eval()
        device = self.doc_groups.device
        tokenize = self.query_encoder.tokenize
        world, rank = distributed.world_size(), distributed.rank()
        texts = list(self.bank_corpus.texts)
        per = math.ceil(len(texts) / world)
        mine = texts[rank * per : (rank + 1) * per]
        emb = encode_in_batches(
            lambda batch: net({k: v.to(device) for k, v in tokenize(batch).items()}).float(),
            mine, self.bank_settings.encode_batch_size, "bank refresh", progress)
        emb = distributed.all_gather_cat(emb.to(device))
        net.train(was_training)
        ids = self.bank_corpus.ids
        self.bank.refresh(emb, ids=ids, text_group=self.doc_groups.cpu()[ids])
        seconds = time.perf_counter() - start
        self.refresh_log.append({"step": -1 if step is None else step, "seconds": seconds, "documents": len(texts)})
        logger.info("bank refresh at step %s: %d documents in %.1f s", step, len(texts), seconds)
        return seconds

    # ------------------------------------------------------------------ step
    def _step_generator(self, step: int, device: torch.device) -> torch.Generator:
        self._generator = distributed.step_generator(self._generator, self.seed, step, device)
        return self._generator

    def _groups_of(self, ids: Tensor) -> Tensor:
        """Text groups of doc ids (any shape), -1 where the id is -1."""
        safe = ids.clamp(min=0).to(self.doc_groups.device)
        return torch.where(ids.to(self.doc_groups.device) >= 0, self.doc_groups[safe], NO_ID)

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
            ``k`` (B, D) detached, ``pos_logits`` (B,), ``neg_logits`` (B, M).
        """
        if self.bank_due(step):
            self.refresh_bank(step)
        device = ids.device
        exclude = ids.view(-1, 1) if exclude is None else exclude
        exclude_groups = self._groups_of(exclude)
        q = self._embed(self.query_encoder, query)
        if not torch.isfinite(q).all():
            nan = q.sum() * float("nan")
            return {"loss": nan, "accuracy": nan.detach()}
        if not self.shared:
            with torch.no_grad():
                m = cosine_momentum(self.momentum, step, self.total_steps) \
                    if self.momentum_schedule == "cosine" and step is not None else self.momentum
                momentum_update(self.query_encoder, self.key_encoder, m)
        k = self._keys(positive)
        blocks: list[Tensor] = []
        masks: list[Tensor] = []
        if self.in_batch:
            batch_keys, batch_ids = self._in_batch(k, ids, negatives)
            blocks.append(batch_keys)
            masks.append(false_negative_mask(batch_ids, self._groups_of(batch_ids), exclude, exclude_groups))
        if self.queue is not None:
            # A copy: backward needs the keys as they were, after add() overwrote some.
            blocks.append(self.queue.negatives().clone())
            masks.append(false_negative_mask(self.queue.ids, self.queue.labels, exclude, exclude_groups))
        if self.bank is not None:
            s = self.bank_settings
            _, vectors = self.bank.candidates(q, s.candidates, exclude=exclude, exclude_text_dupes=True,
                                              skip_top=s.skip_top, max_similarity=s.max_similarity)
            blocks.append(vectors.to(device))
            masks.append(torch.zeros(vectors.shape[:2], dtype=torch.bool, device=device))
        mask = torch.cat(masks, dim=1)
        if self.max_neg_pos_ratio is not None:
            with torch.no_grad():
                scores = negative_logits(q, blocks)  # (B, M)
                mask = mask | (scores > self.max_neg_pos_ratio * (q * k).sum(1, keepdim=True))
        generator = self._step_generator(step, device) if step is not None else None
        with torch.autocast(device_type=device.type, enabled=False):
            out = contrastive_loss(q, k, blocks, self.temperature, mochi=self.mochi, epoch=epoch,
                                   neg_mask=mask, generator=generator)
        self._write_keys(k.detach(), ids)
        return {"loss": out.loss, "accuracy": out.accuracy, "q": q.detach(), "k": k.detach(),
                "pos_logits": out.pos_logits.detach(), "neg_logits": out.neg_logits.detach()}

    def _in_batch(self, k: Tensor, ids: Tensor, negatives: TokenBatch | None) -> tuple[Tensor, Tensor]:
        """Keys of the global batch, differentiable across processes in the shared mode, and their doc ids."""
        keys, key_ids = k, ids
        if negatives is not None:  # given hard negatives: no doc id, never masked
            hard = self._keys(negatives)
            keys = torch.cat([k, hard])
            key_ids = torch.cat([ids, torch.full((hard.shape[0],), NO_ID, dtype=torch.long, device=ids.device)])
        if distributed.world_size() > 1:
            # Shared mode: other ranks' losses send gradient back to this rank's keys.
            keys = distributed.all_gather_with_grad(keys) if keys.requires_grad else distributed.all_gather_cat(keys)
            key_ids = distributed.all_gather_cat(key_ids)
        return keys, key_ids

    @torch.no_grad()
    def _write_keys(self, k: Tensor, ids: Tensor) -> None:
        if self.queue is not None:
            self.queue.add(k, ids=ids, labels=self._groups_of(ids))
        if self.bank is not None and self.bank_settings.update_with_keys and len(self.bank):
            all_k, all_ids = distributed.all_gather_cat(k), distributed.all_gather_cat(ids)
            known = self.bank.contains(all_ids)
            if known.any():
                self.bank.update(all_ids.cpu()[known], all_k.cpu()[known])
