"""The contrastive core both modality adapters share: one step from a query, its positive and the negative
sources to the loss, and the state around it (momentum key network, queue, bank, reproducible draws).

:class:`ContrastiveCore` is the base class of :class:`mochi_retrieval.moco.MoCo` (images) and
:class:`mochi_retrieval.text_model.TextMoCo` (text). An adapter encodes its inputs, builds this step's
:class:`~mochi_retrieval.negatives.Source` blocks, and calls :meth:`ContrastiveCore.contrastive_step`,
which

1. masks false negatives (:func:`~mochi_retrieval.negatives.negative_mask`);
2. computes InfoNCE over the union of the blocks, with MoCHi's synthetic negatives once it is active; under
   the ``query_only`` gradient rule with a shared encoder, detached blocks (and MoCHi) score the query only
   and the gradient-carrying blocks alone score the documents;
3. writes the step's keys into the persistent sources (the queue, the bank's
   :class:`~mochi_retrieval.bank.BankSource`, and any registered with
   :meth:`ContrastiveCore.add_negative_source`).

A new source that lives across steps (a cross-batch memory, a fixed set of given negatives) is one class
implementing :class:`~mochi_retrieval.negatives.NegativeSource`, registered on a model with
``add_negative_source(name, source)``: its block joins every step after the adapter's own blocks (and the
queue's), masking, MoCHi's pool and the monitors included; this file does not change.

Gradient rule (``gradient``). Negatives that carry no gradient (a queue, a bank's stored vectors, MoCHi's
synthetic points) take softmax mass from the gradient-carrying documents, so with a shared encoder each
document is pulled to its query and hardly pushed from the others. ``"query_only"`` splits the loss in two
terms: the union scores the query (documents detached), the gradient-carrying blocks alone score the
documents (query detached). ``"joint"`` keeps one softmax over everything. With a momentum key network
(MoCo) documents get no gradient at all and both rules are the one-softmax loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from . import distributed, mixing
from .bank import BankSettings, BankSource, FaissNegativeBank
from .clusters import same_cluster_mask, spherical_kmeans
from .encoders import cosine_momentum, momentum_update
from .errors import require
from .false_negatives import FalseNegativeConfig, FalseNegativeStep, false_negative_step
from .loss import ContrastiveOutput, MoCHiConfig, contrastive_loss, info_nce_from_logits, negative_logits
from .negatives import NO_ID, NegativeSource, Query, Source, negative_mask
from .queue import MomentumQueue

Gradient = Literal["query_only", "joint"]


@dataclass
class MoCoConfig:
    """The contrastive core's settings: queue, momentum key network, temperature, negatives (the ``moco``
    section of a training config). Each value is checked here, once."""

    queue_size: int = 65536
    """Number of keys K in the negative queue (0 = no queue, text runs only)."""
    momentum: float = 0.999
    """EMA momentum m of the key encoder (final value under the cosine schedule)."""
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    """Keep m fixed, or raise it from ``momentum`` towards 1 on a cosine."""
    temperature: float = 0.2
    """Softmax temperature T of the InfoNCE logits."""
    mask_same_label: bool = False
    """Mask queue entries that share the query's label (false negatives), when labels exist."""
    symmetric: bool = False
    """Images: both views are queries, each scored against the other's key (the loss averages the two
    directions, and both keys are enqueued), as in MoCo v3 and MoCo's CIFAR demo; about twice a step's cost."""
    in_batch_negatives: bool = True
    """Text: the batch's other documents are negatives too (with gradient in the shared mode)."""
    max_neg_pos_ratio: float | None = None
    """Mask negatives (any source) with q.n above this share of q.k (near-duplicate false negatives); null = off."""
    false_negative_clusters: int = 0
    """Label-free false-negative masking: spherical k-means with this many clusters over the queue's keys, and
    each negative in the cluster of the query's positive key is masked (:mod:`mochi_retrieval.clusters`);
    0 = off. Needs the queue."""
    cluster_every: int = 50
    """Steps between k-means refreshes of those clusters (each starts from the previous centroids)."""
    cluster_start_epoch: float = 2.0
    """Epoch from which the cluster mask applies (early keys cluster poorly)."""
    gradient: Gradient = "query_only"
    """Text, shared encoder: detached negatives (queue, bank vectors, MoCHi) score the query only and the
    documents get the in-batch (and mined) term's gradient ("query_only"), or one softmax over all ("joint")."""

    def __post_init__(self) -> None:
        require(self.max_neg_pos_ratio is None or self.max_neg_pos_ratio > 0, "max_neg_pos_ratio", "> 0 or null",
                self.max_neg_pos_ratio)
        require(self.queue_size >= 0, "queue_size", ">= 0 (0 = no queue, text runs only)", self.queue_size)
        require(0.0 <= self.momentum <= 1.0, "momentum", "in [0, 1]", self.momentum)
        require(self.momentum_schedule in ("constant", "cosine"), "momentum_schedule", "'constant' or 'cosine'",
                self.momentum_schedule)
        require(self.temperature > 0, "temperature", "> 0", self.temperature)
        require(self.false_negative_clusters >= 0, "false_negative_clusters", ">= 0 (0 = off)",
                self.false_negative_clusters)
        require(self.false_negative_clusters == 0 or self.queue_size > 0, "false_negative_clusters",
                "0 without a queue (the clusters are the queue's keys)", self.false_negative_clusters)
        require(self.cluster_every >= 1, "cluster_every", ">= 1", self.cluster_every)
        require(self.cluster_start_epoch >= 0, "cluster_start_epoch", ">= 0", self.cluster_start_epoch)
        require(self.gradient in ("query_only", "joint"), "gradient", "'query_only' or 'joint'", self.gradient)


class ContrastiveCore(nn.Module):
    """Settings and state shared by the modality adapters, and the step they run.

    Args:
        settings: queue size, momentum m and its schedule ("cosine": from m towards 1 over ``total_steps``,
            BYOL), temperature T, negatives and the gradient rule (see the module docstring).
        total_steps: length of the momentum schedule, in forward calls.
        mochi: MoCHi settings, or None.
        seed: seeds the MoCHi draws of step t as (seed, t, rank), so a resumed run repeats them.
        false_negatives: label-free false-negative handling (:mod:`mochi_retrieval.false_negatives`), or None.
    """

    def __init__(self, settings: MoCoConfig, *, total_steps: int | None, mochi: MoCHiConfig | None,
                 seed: int, false_negatives: FalseNegativeConfig | None = None) -> None:
        super().__init__()
        self.false_negatives = false_negatives if false_negatives is not None and false_negatives.enabled else None
        self.fn_step: FalseNegativeStep | None = None  # last step's handling (a monitor's input)
        if settings.momentum_schedule == "cosine" and not total_steps:
            raise ValueError("momentum_schedule='cosine' needs total_steps")
        self.settings, self.mochi, self.seed, self.total_steps = settings, mochi, seed, total_steps
        self.temperature, self.gradient = settings.temperature, settings.gradient
        self.momentum, self.momentum_schedule = settings.momentum, settings.momentum_schedule
        self.queue: MomentumQueue | None = None
        self.bank: FaissNegativeBank | None = None
        self.bank_settings: BankSettings | None = None
        self.replicate_bank = False
        self._generator: torch.Generator | None = None
        self._memories: dict[str, NegativeSource] = {}  # persistent sources, in block order
        self.bank_source: BankSource | None = None  # the bank's search rules (a persistent source, "bank")
        self.cluster_masked: Tensor | None = None  # (B, M) last step's cluster mask (a monitor's input)
        # The bank's rows travel in the state dict as plain tensors under "bank.*" (when there is a bank), so a
        # resumed run neither loses nor redoes them; a state without them loads as "no bank saved".
        self.register_state_dict_post_hook(_save_bank)
        self.register_load_state_dict_pre_hook(_load_bank)

    def _init_negatives(self, queue_size: int, dim: int, bank: BankSettings | None, bank_items: int) -> None:
        """Create the queue (K = ``queue_size``, 0 = none) and the bank over ``bank_items`` items.

        Called by the adapter right after its networks: the queue's random initial keys come from the global
        generator, after the networks' initial weights.
        """
        self.queue = MomentumQueue(queue_size, dim) if queue_size > 0 else None
        clusters = self.settings.false_negative_clusters
        if clusters > queue_size:
            raise ValueError(f"moco.false_negative_clusters={clusters} is more than the queue's {queue_size} keys")
        # (C, D) centroids of the queue's keys; all zero until the first refresh. Saved in checkpoints.
        self.register_buffer("fn_centroids", torch.zeros(clusters, dim) if clusters else None)
        if self.queue is not None:
            self._memories["queue"] = self.queue
        self.bank_settings = bank
        if bank is not None:
            wanted = bank.candidates + bank.mined_negatives + bank.skip_top
            if wanted > bank_items:
                mined = f" + mined_negatives={bank.mined_negatives}" if bank.mined_negatives else ""
                raise ValueError(f"bank.candidates={bank.candidates}{mined} (+ skip_top={bank.skip_top}) is more "
                                 f"than the {self._bank_items_name} holds ({bank_items} {self._bank_item_unit})")
            self.bank = FaissNegativeBank(bank.backend, bank.device, index=bank.index,
                                          search_params=bank.search_params, shard=bank.shard,
                                          drift_correction=bank.drift_correction,
                                          recall_queries=bank.recall_queries, rerank=bank.rerank,
                                          rows_dir=bank.rows_dir,
                                          recall_k=max(1, bank.candidates + bank.mined_negatives))

    def _use_bank(self, source: BankSource) -> None:
        """Register the bank's source (its search rules, set by the adapter) right after the queue: its block
        follows the queue's and it takes the step's keys like any persistent source."""
        self.bank_source = source
        self._memories["bank"] = source

    _bank_items_name, _bank_item_unit = "corpus", "documents"

    def add_negative_source(self, name: str, source: NegativeSource) -> None:
        """Register a source of negatives that lives across steps.

        Each step, ``source.source(query, name)`` yields a block (after the queue's, in registration
        order), and after the loss ``source.add(keys, ids=..., labels=...)`` takes the step's keys. A source
        that is an ``nn.Module`` becomes a submodule named ``name``: its buffers move with the model, are
        saved in checkpoints and are checked across processes with the queue.
        """
        if not isinstance(source, NegativeSource):
            raise TypeError(f"negative source {name!r}: {type(source).__name__} does not implement "
                            "NegativeSource (methods source(query, name) and add(keys, ids=, labels=))")
        if not name.isidentifier() or name in self._memories or hasattr(self, name):
            raise ValueError(f"negative source name {name!r} must be a new Python identifier "
                             f"(taken: {sorted(self._memories)} and the model's attributes)")
        if isinstance(source, nn.Module):
            self.add_module(name, source)
        self._memories[name] = source

    # ------------------------------------------------------------------ state
    def momentum_at(self, step: int | None) -> float:
        """The key network's EMA coefficient at forward call ``step``."""
        if self.momentum_schedule == "cosine" and step is not None:
            return cosine_momentum(self.momentum, step, self.total_steps)
        return self.momentum

    @torch.no_grad()
    def _momentum_step(self, online: nn.Module, target: nn.Module, step: int | None) -> None:
        momentum_update(online, target, self.momentum_at(step))

    def _step_generator(self, step: int, device: torch.device) -> torch.Generator:
        self._generator = distributed.step_generator(self._generator, self.seed, step, device)
        return self._generator

    def replicated_state(self) -> dict[str, Tensor]:
        """State every process must hold identically: the buffers of the queue and of the other persistent
        sources that are modules (and, for text, the bank's embeddings; sharded, its id and group tables)."""
        state = {f"{name}.{n}": b for name, m in self._memories.items() if isinstance(m, nn.Module)
                 for n, b in m.named_buffers()}
        if self.replicate_bank and self.bank is not None and len(self.bank) and not self.bank.shard:
            state["bank.embeddings"] = self.bank.embeddings
        elif self.bank is not None and self.bank.sharded:  # the tables every shard resolves ids with
            state.update({f"bank.{name}": t for name, t in (("ids", self.bank.ids), ("text_group",
                                                                                      self.bank.text_group))
                          if t is not None})
        return state

    def bank_shard_state(self) -> dict[str, Tensor]:
        """This process's rows of a bank sharded over several processes (embeddings, stamps, and ``layout`` =
        (W, rank, N)), to be saved in a file of its own next to the checkpoint; {} otherwise."""
        if self.bank is None or not self.bank.sharded:
            return {}
        rows = self.bank.rows
        return {"embeddings": rows.embeddings.cpu(), "stamps": rows.stamps.clone(),
                "layout": torch.tensor([rows.world, rows.rank, len(rows)], dtype=torch.long)}

    @property
    def bank_shard_pending(self) -> bool:
        """Whether a loaded state holds a sharded bank whose rows :meth:`load_bank_shard` must still bring."""
        return getattr(self, "_pending_bank", None) is not None

    def load_bank_shard(self, part: dict[str, Tensor]) -> None:
        """Complete a sharded bank's load with this process's :meth:`bank_shard_state` (after ``load_state_dict``)."""
        pending = getattr(self, "_pending_bank", None)
        if pending is None:
            raise RuntimeError("load_bank_shard: load the model's state (with its sharded bank) first")
        world, rank = self.bank.layout()
        saved = part["layout"].tolist()
        if saved[:2] != [world, rank] or saved[2] != int(pending["layout"][1]):
            raise ValueError(f"bank shard of process {saved[1]} of {saved[0]} ({saved[2]} rows) given to process "
                             f"{rank} of {world} (bank of {int(pending['layout'][1])} rows)")
        self._pending_bank = None
        self.bank.load_state_dict({**pending, "embeddings": part["embeddings"], "stamps": part["stamps"]})

    @staticmethod
    def _diverged(q: Tensor) -> dict[str, Tensor] | None:
        """A NaN loss (the trainer stops on it) when the queries are not finite, rather than failing later
        inside the hard-pool selection; None when they are."""
        if torch.isfinite(q).all():
            return None
        nan = q.sum() * float("nan")
        return {"loss": nan, "accuracy": nan.detach()}

    def _memory_sources(self, query: Query) -> list[Source]:
        """This step's blocks of the persistent sources (the queue first), built before any key is written."""
        blocks = [memory.source(query, name) for name, memory in self._memories.items()]
        return [b for b in blocks if b.width]  # a bank of mined negatives only has an empty stored block

    # ------------------------------------------------------------------ step
    def contrastive_step(self, q: Tensor, k: Tensor, sources: Sequence[Source], *, ids: Tensor | None,
                         groups: Tensor | None, epoch: float, step: int | None, documents_grad: bool = False,
                         dedupe: bool = True, max_neg_pos_ratio: float | None = None,
                         support: Tensor | None = None,
                         same_class: Tensor | None = None) -> tuple[ContrastiveOutput, Tensor]:
        """Mask, loss, key writes: returns the output (logits, plan) and the loss to back-propagate.

        The blocks must be built before this call: the key writes overwrite queue and bank entries.

        Args:
            q: (B, D) unit queries (with gradient); k: (B, D) unit positives (with gradient when
                ``documents_grad``).
            sources: this step's blocks, in order.
            ids, groups: (B,) id and group of each positive, written with the keys.
            epoch: fractional epoch, for the MoCHi warm-up; step: forward-call index (reproducible draws).
            documents_grad: whether documents share the query encoder (and get gradient).
            dedupe, max_neg_pos_ratio: see :func:`~mochi_retrieval.negatives.negative_mask`.
            support: (S, B, D) unit support views of the B images (false-negative detection), or None.
            same_class: (B, M) entries of the query's class, for the detector's label control
                (``false_negatives.oracle``), or None.
        """
        mask = negative_mask(q, k, sources, dedupe=dedupe, max_neg_pos_ratio=max_neg_pos_ratio)
        self.cluster_masked = self._cluster_mask(k.detach(), sources, epoch, step)
        if self.cluster_masked is not None:
            self.cluster_masked = self.cluster_masked & ~mask  # what the clusters add to the other rules
            mask = mask | self.cluster_masked
        k_loss, positives = k, None
        self.fn_step = None
        if self.false_negatives is not None:
            if documents_grad:
                raise ValueError("false-negative handling is an option of a momentum key network (images)")
            self.fn_step = false_negative_step(self.false_negatives, q, k, [s.vectors for s in sources], mask,
                                               support, epoch, same_class)
            if self.fn_step is not None:
                mask, positives, k_loss = self.fn_step.mask, self.fn_step.positives, self.fn_step.positive_key
        generator = self._step_generator(step, q.device) if step is not None else None
        # The contrastive head runs in float32 even under autocast.
        with torch.autocast(device_type=q.device.type, enabled=False):
            out, loss = self._loss(q, k_loss, sources, mask, epoch, generator, documents_grad, positives)
        self.write_keys(k.detach(), ids, groups)
        return out, loss

    def _loss(self, q: Tensor, k: Tensor, sources: Sequence[Source], mask: Tensor, epoch: float,
              generator: torch.Generator | None, documents_grad: bool,
              positives: Tensor | None = None) -> tuple[ContrastiveOutput, Tensor]:
        """The union's InfoNCE; under the query-only rule with gradient-carrying documents, plus the document
        term (see the module docstring). ``positives`` (B, M): extra positives (multi-positive InfoNCE)."""
        blocks = [s.vectors for s in sources]
        mochi = self._step_mochi(mask if positives is None else mask | positives, epoch)
        detached = mochi is not None or any(not s.grad for s in sources)
        if not (documents_grad and self.gradient == "query_only" and detached):
            out = contrastive_loss(q, k, blocks, self.temperature, mochi=mochi, epoch=epoch,
                                   neg_mask=mask, generator=generator, positives=positives)
            return out, out.loss
        out = contrastive_loss(q, k.detach(), [v.detach() for v in blocks], self.temperature, mochi=mochi,
                               epoch=epoch, neg_mask=mask, generator=generator)
        keep = [i for i, s in enumerate(sources) if s.grad]
        if not keep:
            return out, out.loss
        cols = torch.cat([torch.full((s.width,), s.grad, dtype=torch.bool) for s in sources]).to(mask.device)
        qd = q.detach()
        grad_blocks = [blocks[i] for i in keep]
        pos, neg = (qd * k).sum(1), negative_logits(qd, grad_blocks, mask[:, cols])
        synthetic = self._document_mixes(qd, pos, neg, grad_blocks, mochi, generator)
        return out, out.loss + info_nce_from_logits(pos, neg, self.temperature, synthetic)

    def _document_mixes(self, qd: Tensor, pos: Tensor, neg: Tensor, blocks: list[Tensor],
                        mochi: MoCHiConfig | None, generator: torch.Generator | None) -> Tensor | None:
        """(B, s + s') un-scaled logits q̄.h of MoCHi points mixed from the gradient-carrying documents, with
        their gradient (``mochi.document_mixes``), or None. qd: (B, D) detached queries; pos (B,), neg (B, M)
        their scores against the positives and those documents (masked -inf); blocks: the documents."""
        self.last_document_plan = None
        if mochi is None or not mochi.document_mixes:
            return None
        left = neg.shape[1] - int(torch.isinf(neg).sum(1).max())  # the fewest unmasked documents of any query
        n_hard = min(mochi.n_hard, left)
        if n_hard < 2 or not (mochi.n_mix or mochi.n_query_mix):
            return None
        plan = mixing.sample_plan(neg.detach(), n_hard, mochi.n_mix, mochi.n_query_mix, mochi.beta_max, generator)
        self.last_document_plan = plan
        logits = torch.einsum("bd,bsd->bs", qd, mixing.mix_points(qd, blocks, plan))  # with the documents' gradient
        if mochi.cap_at_positive:
            logits = logits.masked_fill(logits.detach() > pos.detach().unsqueeze(1), float("-inf"))
        return logits

    @torch.no_grad()
    def _cluster_mask(self, k: Tensor, sources: Sequence[Source], epoch: float, step: int | None) -> Tensor | None:
        """(B, M) negatives in the cluster of the query's positive key, or None (off, before
        ``cluster_start_epoch``, or while the queue holds fewer real keys than clusters). Refreshes the
        centroids every ``cluster_every`` steps from the queue's real keys (its random initial keys left out);
        the queue is the same on every process and the draw is seeded by (seed, step), so are the centroids."""
        c = self.settings.false_negative_clusters
        if not c or epoch < self.settings.cluster_start_epoch:
            return None
        unset = not bool(self.fn_centroids.any())
        if unset or step is None or step % self.settings.cluster_every == 0:
            real = self.queue.keys[self.queue.ids != NO_ID]
            if real.shape[0] < c:
                return None
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (step or 0))
            self.fn_centroids.copy_(spherical_kmeans(real, c, generator=generator,
                                                     init=None if unset else self.fn_centroids))
        return same_cluster_mask(k, [s.vectors for s in sources], self.fn_centroids)

    def _step_mochi(self, mask: Tensor, epoch: float) -> MoCHiConfig | None:
        """This step's MoCHi settings: None before the warm-up; the hard pool shrunk to the fewest unmasked
        negatives of any query (masks and duplicates vary per step); None when under 2 remain."""
        if self.mochi is None or not self.mochi.active(epoch):
            return None
        left = mask.shape[1] - int(mask.sum(1).max())  # the fewest unmasked negatives of any query
        if left >= self.mochi.n_hard:
            return self.mochi
        if left < 2:
            return None
        return dataclasses.replace(self.mochi, n_hard=left)

    @torch.no_grad()
    def write_keys(self, k: Tensor, ids: Tensor | None, groups: Tensor | None) -> None:
        """Give the step's keys (B, D) to the persistent sources (the queue: enqueue; the bank: write them into
        the rows of their ids)."""
        for memory in self._memories.values():
            memory.add(k, ids=ids, labels=groups)


BANK_STATE = "bank."  # state-dict prefix of the bank's rows


def _save_bank(module: ContrastiveCore, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the bank's rows (embeddings, ids, groups, staleness stamps), tensors only. A bank
    sharded over several processes keeps its tables and layout here; each process's rows go to its own file
    (:meth:`ContrastiveCore.bank_shard_state`)."""
    if module.bank is not None and len(module.bank):
        state = module.bank.state_dict()
        if module.bank.sharded:
            state = {key: state[key] for key in ("ids", "text_group", "layout")}
        for key, value in state.items():
            state_dict[prefix + BANK_STATE + key] = value


def _load_bank(module: ContrastiveCore, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: take the bank's rows out of ``state_dict`` (a copy) into the bank; a bank
    sharded over several processes waits for this process's rows (:meth:`ContrastiveCore.load_bank_shard`)."""
    keys = [k for k in state_dict if k.startswith(prefix + BANK_STATE)]
    if not keys:
        return
    if module.bank is None:
        raise ValueError("the checkpoint holds a bank but this model has none (bank.enabled differs)")
    state = {k[len(prefix + BANK_STATE):]: state_dict.pop(k) for k in keys}
    module.bank.check_layout(state)
    if "embeddings" in state:
        module.bank.load_state_dict(state)
    else:
        module._pending_bank = state


def no_ids(batch: int, device: torch.device) -> Tensor:
    """(B, 1) of -1: nothing to exclude."""
    return torch.full((batch, 1), NO_ID, dtype=torch.long, device=device)


__all__ = ["ContrastiveCore", "Gradient", "MoCoConfig", "no_ids"]
