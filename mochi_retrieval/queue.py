"""MoCo momentum queue: a fixed-size ring buffer of keys, a negative source.

It follows :class:`mochi_retrieval.negatives.NegativeSource`: ``source(query)``
gives the step's block (with its false-negative mask), ``add(keys, ids, labels)``
takes the step's keys. Sources never compute losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_cat
from .negatives import NO_ID, Query, Source, false_negative_mask


class MomentumQueue(nn.Module):
    """Ring buffer of K unit-norm keys with optional instance ids and labels.

    Keys are gathered from every process before they are written, in rank order,
    so every rank holds the same queue in the same order: the queue a single
    process would build from the concatenated global batches. K need not be a
    multiple of the global batch: writes wrap around the end.

    Args:
        size: K, number of keys held.
        dim: D, key dimension.
        generator: optional generator for the random initial keys.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        # Random unit rows: normalise each key (dim 1), not each coordinate.
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("keys", init)
        self.register_buffer("ids", torch.full((size,), NO_ID, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), NO_ID, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_added", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def negatives(self) -> torch.Tensor:
        """(K, D) the current keys (a view; do not modify)."""
        return self.keys

    @torch.no_grad()
    def add(
        self,
        keys: torch.Tensor,
        ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        gather: bool = True,
    ) -> None:
        """Enqueue this rank's keys (n, D), replacing the oldest entries.

        Args:
            keys: (n, D) unit keys; detached before storing.
            ids: (n,) instance ids, for masking same-instance entries.
            labels: (n,) class labels, for masking same-label entries.
            gather: gather from every process first (keep True under DDP).
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got shape {tuple(keys.shape)}")
        n_local = keys.shape[0]
        ids = self._column(ids, n_local, "ids", keys.device)
        labels = self._column(labels, n_local, "labels", keys.device)
        if gather:
            keys, ids, labels = all_gather_cat(keys, None), all_gather_cat(ids), all_gather_cat(labels)
        size, n = len(self), keys.shape[0]
        if n > size:  # only the newest K survive a write longer than the queue
            keys, ids, labels = keys[-size:], ids[-size:], labels[-size:]
        ptr = int(self.ptr)
        start = (ptr + max(0, n - size)) % size
        pos = (start + torch.arange(min(n, size), device=self.keys.device)) % size
        self.keys.index_copy_(0, pos, keys.detach().to(self.keys.dtype))
        self.ids.index_copy_(0, pos, ids.to(self.ids.device))
        self.labels.index_copy_(0, pos, labels.to(self.labels.device))
        self.ptr.fill_((ptr + n) % size)
        self.num_added.add_(n)

    @staticmethod
    def _column(values: torch.Tensor | None, n: int, name: str, device) -> torch.Tensor:
        if values is None:
            return torch.full((n,), NO_ID, dtype=torch.long, device=device)
        if values.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(values.shape)}")
        return values.to(device=device, dtype=torch.long)

    def source(self, query: Query, name: str = "queue") -> Source:
        """This step's block: a copy of the keys, ids and labels (backward and the monitors need them as
        they were before :meth:`add` overwrites some), no gradient, and each query's false negatives."""
        dev = self.ids.device
        mask = false_negative_mask(self.ids, self.labels, query.exclude.to(dev), query.exclude_groups.to(dev))
        return Source(name, self.keys.clone(), self.ids.clone(), self.labels.clone(), False, mask)

    def exclusion_mask(
        self, ids: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """(B, K) bool, True where an entry is a false negative for the query.

        An entry is excluded when it holds the query's own instance (same id) or,
        if ``labels`` is given, the query's class. Entries from the random
        initialisation (id/label -1) are never excluded. Returns None when
        neither ids nor labels are given.
        """
        if ids is None and labels is None:
            return None
        dev = self.ids.device
        none = torch.full(((ids if ids is not None else labels).shape[0], 1), NO_ID, dtype=torch.long, device=dev)
        exclude = ids.view(-1, 1).to(dev) if ids is not None else none
        groups = labels.view(-1, 1).to(dev) if labels is not None else none
        return false_negative_mask(self.ids, self.labels, exclude, groups)
