"""MoCo-v2 (+ MoCHi) as one module: query network, momentum key network, queue, loss.

One call of :meth:`MoCo.forward` is one training step's maths: momentum update,
key encoding (with shuffle BN across processes), InfoNCE with optional MoCHi
negatives, and enqueueing the keys. It returns named tensors; the trainer owns
optimisation, devices and logging.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .encoders import EncoderWithHead, cosine_momentum, ProjectionHead, encoder_output_dim, make_momentum_copy, momentum_update
from .bank import BankSettings, FaissNegativeBank
from .loss import ContrastiveOutput, MoCHiConfig, MoCHiLoss
from .queue import MomentumQueue


class MoCo(nn.Module):
    """MoCo-v2 with an optional MoCHi hard-negative mixer.

    Args:
        encoder: backbone mapping a batch to (B, F) features (exposes ``output_dim``).
        head_hidden_dim, head_out_dim, head_layers: the MLP projection head.
        queue_size: K, negatives kept in the queue.
        momentum: EMA coefficient m of the key network.
        temperature: T of the InfoNCE loss.
        mochi: MoCHi settings, or None for plain MoCo.
        mask_same_instance: drop queue entries holding the query's own image
            (an older key of it) from the negatives.
        mask_same_label: also drop entries of the query's class (supervised
            masking; needs labels).
        shuffle_bn: shuffle the key batch across processes (MoCo's shuffle BN);
            has no effect in a single process.
        momentum_schedule: "constant", or "cosine" from m towards 1 over
            ``total_steps`` (BYOL).
        total_steps: length of the momentum schedule, in forward calls.
        seed: seeds the MoCHi draws of step t as (seed, t), so a resumed run
            repeats them.
        bank: optional FAISS bank over the training set's key embeddings: row i
            holds the latest key of item i (random until item i is first seen),
            written with each batch's keys; each query gets its top
            ``bank.candidates`` rows (its own item excluded, and its class too
            under ``mask_same_label``) as extra negatives, also in MoCHi's pool.
        bank_labels: (N,) class of every training item (sizes the bank; -1 = unknown).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        head_hidden_dim: int = 2048,
        head_out_dim: int = 128,
        head_layers: int = 2,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        mochi: MoCHiConfig | None = None,
        mask_same_instance: bool = True,
        mask_same_label: bool = False,
        shuffle_bn: bool = True,
        momentum_schedule: str = "constant",
        total_steps: int | None = None,
        seed: int = 0,
        bank: BankSettings | None = None,
        bank_labels: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if bank is not None and (bank_labels is None or bank.candidates + bank.skip_top > bank_labels.numel()):
            raise ValueError(f"bank: needs bank_labels for every training item and more items than "
                             f"bank.candidates + skip_top; got {None if bank_labels is None else bank_labels.numel()}")
        if mochi is not None and mochi.n_hard > queue_size:
            raise ValueError(f"MoCHi n_hard={mochi.n_hard} is larger than the queue (queue_size={queue_size})")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        head = ProjectionHead(encoder_output_dim(encoder), head_hidden_dim, head_out_dim, head_layers)
        self.query_net = EncoderWithHead(encoder, head)
        self.key_net = make_momentum_copy(self.query_net)
        self.queue = MomentumQueue(queue_size, head_out_dim)
        self.criterion = MoCHiLoss(temperature, mochi)
        self.momentum = momentum
        self.mask_same_instance = mask_same_instance
        self.mask_same_label = mask_same_label
        self.shuffle_bn = shuffle_bn
        if momentum_schedule not in ("constant", "cosine"):
            raise ValueError(f"momentum_schedule must be 'constant' or 'cosine', got {momentum_schedule!r}")
        if momentum_schedule == "cosine" and not total_steps:
            raise ValueError("momentum_schedule='cosine' needs total_steps")
        self.momentum_schedule, self.total_steps, self.seed = momentum_schedule, total_steps, seed
        self._generator: torch.Generator | None = None
        self.bank_settings, self.bank = bank, None
        if bank is not None:
            self.bank = FaissNegativeBank(bank.backend, bank.device)
            g = torch.Generator().manual_seed(seed)
            init = torch.randn(bank_labels.numel(), head_out_dim, generator=g)
            self.bank.refresh(init, text_group=bank_labels.detach().cpu().long())

    def momentum_at(self, step: int | None) -> float:
        if self.momentum_schedule == "cosine" and step is not None:
            return cosine_momentum(self.momentum, step, self.total_steps)
        return self.momentum

    def _step_generator(self, step: int, device: torch.device) -> torch.Generator:
        self._generator = distributed.step_generator(self._generator, self.seed, step, device)
        return self._generator

    @property
    def encoder(self) -> nn.Module:
        """The query backbone, without the head: what evaluation and export use."""
        return self.query_net.encoder

    def replicated_state(self) -> dict[str, torch.Tensor]:
        """State every process must hold identically: the queue and its pointer."""
        return {f"queue.{name}": buf for name, buf in self.queue.named_buffers()}

    @torch.no_grad()
    def encode_keys(self, view_k: torch.Tensor) -> torch.Tensor:
        """(B, ...) key views -> (B, out_dim) unit keys from the momentum network."""
        if self.shuffle_bn and distributed.world_size() > 1:
            shuffled, undo = distributed.shuffle_batch(view_k)
            k = distributed.unshuffle_batch(self.key_net(shuffled), undo)
        else:
            k = self.key_net(view_k)
        return F.normalize(k.float(), dim=1)

    def forward(
        self,
        view_q: torch.Tensor,
        view_k: torch.Tensor,
        *,
        ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        epoch: float = math.inf,
        step: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """One step: returns ``loss`` (with gradient) and detached diagnostics inputs.

        Args:
            view_q, view_k: (B, ...) two augmented views of the same B images.
            ids: (B,) instance ids (dataset indices), for same-instance masking.
            labels: (B,) class labels, for same-label masking and diagnostics.
            epoch: fractional epoch, for the MoCHi warm-up.
            step: index of this forward call, for the momentum schedule and
                reproducible MoCHi draws.

        Returns:
            dict with ``loss`` (scalar), ``accuracy``, ``q`` and ``k`` (B, D)
            detached, ``pos_logits`` (B,), ``neg_logits`` (B, K), ``queue_labels``
            (K,) of the entries scored (-1 = unknown; (B, K + c) per query with a bank), and when mixing
            ran ``hard_idx``, ``pair_i``, ``pair_j``, ``query_j``.
        """
        q = F.normalize(self.query_net(view_q).float(), dim=1)
        if not torch.isfinite(q).all():
            # Diverged: report a NaN loss (the trainer stops on it) rather than
            # failing later inside the hard-pool selection.
            nan = q.sum() * float("nan")
            return {"loss": nan, "accuracy": nan.detach()}
        with torch.no_grad():
            momentum_update(self.query_net, self.key_net, self.momentum_at(step))
        k = self.encode_keys(view_k)
        mask = self.queue.exclusion_mask(
            ids if self.mask_same_instance else None, labels if self.mask_same_label else None
        )
        generator = self._step_generator(step, q.device) if step is not None else None
        # The contrastive head runs in float32 even under autocast.
        # A copy: backward needs the keys as they were, after add() overwrote some.
        negatives = self.queue.negatives().clone()
        # Labels of the entries the logits were computed against, for diagnostics.
        queue_labels = self.queue.labels.clone()
        if self.bank is not None:
            negatives, mask, queue_labels = self._with_bank(q, ids, negatives, mask, queue_labels)
        with torch.autocast(device_type=q.device.type, enabled=False):
            out: ContrastiveOutput = self.criterion(
                q, k, negatives, epoch=epoch, neg_mask=mask, generator=generator
            )
        self.queue.add(k, ids=ids, labels=labels)
        if self.bank is not None and self.bank_settings.update_with_keys:
            self.bank.update(distributed.all_gather_cat(ids).cpu(), distributed.all_gather_cat(k).cpu())
        result = {
            "loss": out.loss,
            "accuracy": out.accuracy,
            "q": q.detach(),
            "k": k,
            "pos_logits": out.pos_logits.detach(),
            "neg_logits": out.neg_logits.detach(),
            "queue_labels": queue_labels,
        }
        if out.plan is not None:
            result.update(hard_idx=out.plan.hard_idx, pair_i=out.plan.pair_i, pair_j=out.plan.pair_j,
                          query_j=out.plan.query_j)
        return result

    def _with_bank(self, q, ids, queue_negs, mask, queue_labels):
        """Append each query's bank candidates: negatives (queue, (B, c, D)), mask and labels (B, K + c)."""
        if ids is None:
            raise ValueError("a bank needs the instance ids of the batch (ids=...)")
        s = self.bank_settings
        cand_ids, vectors = self.bank.candidates(
            q.detach(), s.candidates, exclude=ids.view(-1, 1), exclude_text_dupes=self.mask_same_label,
            skip_top=s.skip_top, max_similarity=s.max_similarity)
        b, c = cand_ids.shape
        if mask is not None:  # the bank already left out the query's own item (and class)
            mask = torch.cat([mask, torch.zeros(b, c, dtype=torch.bool, device=q.device)], dim=1)
        groups = self.bank.text_group.to(q.device)
        labels = torch.cat([queue_labels.view(1, -1).expand(b, -1), groups[cand_ids.to(q.device)]], dim=1)
        return (queue_negs, vectors.to(q.device)), mask, labels
