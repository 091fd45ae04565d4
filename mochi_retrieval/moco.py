"""MoCo-v2 (+ MoCHi) for images: the image adapter of the contrastive core.

One call of :meth:`MoCo.forward` is one training step's maths: momentum update,
key encoding (with shuffle BN across processes), then the core's step
(:class:`~mochi_retrieval.core.ContrastiveCore`): InfoNCE over the queue (and
the bank's candidates) with optional MoCHi negatives, and the key writes. It
returns named tensors; the trainer owns optimisation, devices and logging.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .bank import BankSettings, BankSource
from .core import ContrastiveCore, MoCoConfig, no_ids
from .encoders import EncoderWithHead, ProjectionHead, encoder_output_dim, make_momentum_copy
from .encoders.split_bn import convert_split_batchnorm
from .false_negatives import FalseNegativeConfig, detector_monitors, same_class
from .loss import MoCHiConfig
from .negatives import Query


class MoCo(ContrastiveCore):
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
        max_neg_pos_ratio: mask every negative with q.n above this share of the
            query's q.k (an unsupervised false-negative ceiling: near duplicates of
            the query score above its positive); None = off.
        symmetric: both views are queries, each against the other's key (a batch of
            2B queries: the two directions' mean loss; both keys are enqueued).
        shuffle_bn: shuffle the key batch across processes (MoCo's shuffle BN), so
            the BatchNorm statistics a key sees come from other images than its
            query's; in a single process this needs ``bn_splits`` > 1.
        bn_splits: encode queries and keys in this many sub-batches, each with its
            own BatchNorm statistics (per process), as ``bn_splits`` GPUs would; the
            key batch is shuffled before the split (under ``shuffle_bn``). With one
            process and 1 split, the query and its positive key are normalised over
            the same images, the leak shuffle BN exists to close (MoCo, section 3.3). The networks'
            BatchNorm1d/2d layers become :class:`~mochi_retrieval.encoders.split_bn.SplitBatchNorm2d` (1d)
            so that one pass normalises each group on its own (other batch norms: a pass per group).
        false_negative_clusters: label-free false-negative masking: spherical k-means with this many
            clusters over the queue's keys (refreshed every ``cluster_every`` steps), and each negative in the
            cluster of the query's positive key is masked, from epoch ``cluster_start_epoch`` on; 0 = off.
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
        false_negatives: label-free false-negative handling (support-view detection with elimination or
            attraction, or the nearest-neighbour positive; :mod:`mochi_retrieval.false_negatives`); the
            detector needs ``view_support`` in :meth:`forward`. None = off.
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
        bn_splits: int = 1,
        symmetric: bool = False,
        max_neg_pos_ratio: float | None = None,
        false_negative_clusters: int = 0,
        cluster_every: int = 50,
        cluster_start_epoch: float = 2.0,
        momentum_schedule: str = "constant",
        total_steps: int | None = None,
        seed: int = 0,
        bank: BankSettings | None = None,
        bank_labels: torch.Tensor | None = None,
        false_negatives: FalseNegativeConfig | None = None,
    ) -> None:
        if bank is not None and bank_labels is None:
            raise ValueError("bank: needs bank_labels, the (N,) class of every training item (it sizes the bank)")
        if mochi is not None and mochi.n_hard > queue_size:
            raise ValueError(f"MoCHi n_hard={mochi.n_hard} is larger than the queue (queue_size={queue_size})")
        settings = MoCoConfig(queue_size=queue_size, momentum=momentum, momentum_schedule=momentum_schedule,
                              temperature=temperature, mask_same_label=mask_same_label, gradient="joint",
                              symmetric=symmetric, max_neg_pos_ratio=max_neg_pos_ratio,
                              false_negative_clusters=false_negative_clusters, cluster_every=cluster_every,
                              cluster_start_epoch=cluster_start_epoch)
        super().__init__(settings, total_steps=total_steps, mochi=mochi, seed=seed, false_negatives=false_negatives)
        head = ProjectionHead(encoder_output_dim(encoder), head_hidden_dim, head_out_dim, head_layers)
        self.query_net = EncoderWithHead(encoder, head)
        self.key_net = make_momentum_copy(self.query_net)
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
        if queue_size <= 0:
            raise ValueError(f"queue size and dim must be positive, got size={queue_size}, dim={head_out_dim}")
        self._init_negatives(queue_size, head_out_dim, bank, 0 if bank_labels is None else bank_labels.numel())
        self.mask_same_instance = mask_same_instance
        self.mask_same_label = mask_same_label
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits
        # One pass of each network with BatchNorm split in groups, where the networks allow it (1.2x faster
        # on a CPU than a pass per group; the same result).
        self._split_in_bn = bn_splits > 1 and all(convert_split_batchnorm(net, bn_splits)
                                                  for net in (self.query_net, self.key_net))
        if self.bank is not None:
            g = torch.Generator().manual_seed(seed)
            init = torch.randn(bank_labels.numel(), head_out_dim, generator=g)
            self.bank.refresh(init, text_group=bank_labels.detach().cpu().long())
            # Each query's bank candidates (B, c, D): its own item excluded (and its class under mask_same_label).
            self._use_bank(BankSource(self.bank, self.bank_settings, exclusion="own",
                                      exclude_text_dupes=mask_same_label))

    _bank_items_name, _bank_item_unit = "training set", "items in bank_labels"

    @property
    def encoder(self) -> nn.Module:
        """The query backbone, without the head: what evaluation and export use."""
        return self.query_net.encoder

    def _split_forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net`` over ``bn_splits`` consecutive sub-batches of x (B, ...) -> (B, out_dim)."""
        if self.bn_splits == 1:
            return net(x)
        if x.shape[0] < 2 * self.bn_splits:
            raise ValueError(f"bn_splits={self.bn_splits} needs a batch of at least {2 * self.bn_splits} images "
                             f"per process (2 per BatchNorm group), got {x.shape[0]}")
        if self._split_in_bn:  # its BatchNorm layers normalise each group on their own
            return net(x)
        return torch.cat([net(chunk) for chunk in torch.tensor_split(x, self.bn_splits)])

    def encode_queries(self, view_q: torch.Tensor) -> torch.Tensor:
        """(B, ...) query views -> (B, out_dim) unit queries (BatchNorm over ``bn_splits`` sub-batches)."""
        return F.normalize(self._split_forward(self.query_net, view_q).float(), dim=1)

    @torch.no_grad()
    def encode_keys(self, view_k: torch.Tensor, step: int | None = None, stream: int = 0) -> torch.Tensor:
        """(B, ...) key views -> (B, out_dim) unit keys from the momentum network.

        Under ``shuffle_bn`` the batch is permuted before the BatchNorm split (across processes when
        there are several, else within this one, drawn from (seed, step)) and un-permuted after, so a
        key's BatchNorm group is not its query's. ``stream`` tells apart the draws of two key batches of one
        step (the symmetric loss)."""
        if self.shuffle_bn and distributed.world_size() > 1:
            shuffled, undo = distributed.shuffle_batch(view_k)
            k = distributed.unshuffle_batch(self._split_forward(self.key_net, shuffled), undo)
        elif self.shuffle_bn and self.bn_splits > 1:
            generator = None
            if step is not None:  # its own stream: the MoCHi draws stay those of (seed, step)
                generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + 7 + stream)
            perm = torch.randperm(view_k.shape[0], generator=generator).to(view_k.device)
            shuffled = self._split_forward(self.key_net, view_k[perm])  # row r is the key of image perm[r]
            k = torch.empty_like(shuffled)
            k[perm] = shuffled
        else:
            k = self._split_forward(self.key_net, view_k)
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
        view_support: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One step: returns ``loss`` (with gradient) and detached diagnostics inputs.

        Args:
            view_q, view_k: (B, ...) two augmented views of the same B images.
            view_support: (S, B, ...) S more views of them, the false-negative detector's support views
                (encoded by the key network only while the handling is active); None without one.
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
        q = self.encode_queries(view_q)
        if self.settings.symmetric:  # view_k's query scores view_q's key: one batch of 2B queries
            q = torch.cat([q, self.encode_queries(view_k)])
        diverged = self._diverged(q)
        if diverged is not None:
            return diverged
        self._momentum_step(self.query_net, self.key_net, step)
        k = self.encode_keys(view_k, step)
        support, support_s = self._encode_support(view_support, epoch, step)
        if self.settings.symmetric:
            k = torch.cat([k, self.encode_keys(view_q, step, stream=1)])
            ids = None if ids is None else ids.repeat(2)
            labels = None if labels is None else labels.repeat(2)
            support = None if support is None else support.repeat(1, 2, 1)
        b = q.shape[0]
        same_instance = self.mask_same_instance and ids is not None
        same_label = self.mask_same_label and labels is not None
        query = Query(q.detach(), ids.view(-1, 1) if same_instance else no_ids(b, q.device),
                      labels.view(-1, 1) if same_label else no_ids(b, q.device), ids=ids)
        sources = self._memory_sources(query)
        # Labels of the entries the logits were computed against, for diagnostics (before the keys are written).
        queue_labels = sources[0].groups if len(sources) == 1 else torch.cat(  # the queue block holds a copy
            [s.per_query(s.groups.to(q.device), b) for s in sources], dim=1)
        out, loss = self.contrastive_step(q, k, sources, ids=ids, groups=labels, epoch=epoch, step=step, dedupe=False,
                                          max_neg_pos_ratio=self.settings.max_neg_pos_ratio, support=support,
                                          same_class=self._same_class(labels, queue_labels))
        result = {
            "loss": loss,
            "accuracy": out.accuracy,
            "q": q.detach(),
            "k": k,
            "pos_logits": out.pos_logits.detach(),
            "neg_logits": out.neg_logits.detach(),
            "queue_labels": queue_labels,
        }
        if labels is not None:
            result["query_labels"] = labels  # (2B,) when symmetric
        if self.cluster_masked is not None:
            result["monitors"] = cluster_monitors(self.cluster_masked, labels, queue_labels)
        if self.fn_step is not None:
            pos = (q.detach() * k).sum(1)  # q.k with the step's own key, also under nearest_positive=replace
            fn = detector_monitors(self.fn_step, pos, self.temperature, labels, queue_labels)
            if support_s is not None:
                fn["fn_support_s"] = torch.tensor(support_s)
            result.setdefault("monitors", {}).update(fn)
        if out.plan is not None:
            result.update(hard_idx=out.plan.hard_idx, pair_i=out.plan.pair_i, pair_j=out.plan.pair_j,
                          query_j=out.plan.query_j)
        return result

    def _same_class(self, labels: torch.Tensor | None, entry_labels: torch.Tensor) -> torch.Tensor | None:
        """(B, M) entries of the query's class, for ``false_negatives.oracle`` (the label control); else None."""
        if self.false_negatives is None or not self.false_negatives.oracle:
            return None
        if labels is None:
            raise ValueError("false_negatives.oracle: the batch carries no labels (it is a label control)")
        return same_class(labels, entry_labels)

    def _encode_support(self, view_support: torch.Tensor | None, epoch: float,
                        step: int | None) -> tuple[torch.Tensor | None, float | None]:
        """(S, B, D) unit support views from the key network and the seconds they took (on an accelerator
        the device is synchronised around them), (None, 0.0) for the key view alone (no extra pass), or
        (None, None) when the detector is off or inactive."""
        fn = self.false_negatives
        if fn is None or not fn.detects or not fn.active(epoch):
            return None, None
        if fn.support_views == 0:
            return None, 0.0
        if view_support is None or view_support.shape[0] < fn.support_views:
            got = "none" if view_support is None else view_support.shape[0]
            raise ValueError(f"false_negatives.support_views={fn.support_views}: the batch must carry that many "
                             f"view_support views (S, B, ...), got {got}")
        sync = torch.cuda.synchronize if view_support.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        views = [self.encode_keys(v, step, stream=2 + i) for i, v in enumerate(view_support[: fn.support_views])]
        sync()
        return torch.stack(views), time.perf_counter() - start


def cluster_monitors(masked: torch.Tensor, labels: torch.Tensor | None,
                     entry_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-step monitors of the cluster mask (B, M): the share of negatives it masks and, with labels, the
    share of those that are the query's class (its precision as a false-negative detector)."""
    stats = {"cluster_masked": masked.float().mean()}
    if labels is not None:
        stats["cluster_precision"] = (same_class(labels, entry_labels) & masked).sum() / masked.sum().clamp(min=1)
    return stats

