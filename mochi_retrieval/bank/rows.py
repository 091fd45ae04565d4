"""The bank's rows: unit embeddings (N, D), their external ids and the id -> row map, the group of each row
(false-negative key) and the step at which each row was last embedded (its staleness)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..search import l2_normalize

NEVER = -1  # stamp of a row never embedded by the model (an image bank's random start)


class BankRows:
    """Row storage of a bank. ``embeddings`` is the source of truth; indexes are caches of it.

    Attributes:
        embeddings: (N, D) float32 unit rows, on ``device``.
        ids: (N,) distinct non-negative external ids, or None (ids are row numbers).
        groups: (N,) long group of each row (equal = a false negative of each other), or None.
        stamps: (N,) long, the step at which each row was last written (``NEVER`` = not by the model).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.embeddings = torch.empty(0, 0)
        self.ids: Tensor | None = None
        self.groups: Tensor | None = None
        self.stamps = torch.empty(0, dtype=torch.long)
        self._sorted_ids: Tensor | None = None
        self._order: Tensor | None = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def replace(self, embeddings: Tensor, ids: Tensor | None, groups: Tensor | None, stamp: int,
                normalized: bool = False) -> None:
        """All rows at once: embeddings (N, D), ids (N,) or None, groups (N,) or None (keeps the current
        groups when they still have N rows)."""
        if embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty (N, D) tensor, got shape {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        if ids is not None:
            ids = ids.detach().to("cpu", torch.long).reshape(-1)
            if ids.shape != (n,) or (ids < 0).any() or ids.unique().numel() != n:
                raise ValueError(f"ids must be {n} distinct non-negative ints, got shape {tuple(ids.shape)}")
            self._sorted_ids, self._order = ids.sort()
        if groups is None and self.groups is not None and self.groups.shape == (n,):
            groups = self.groups
        if groups is not None and groups.reshape(-1).shape != (n,):
            raise ValueError(f"text_group must have shape ({n},), got {tuple(groups.shape)}")
        self.ids = ids
        self.groups = None if groups is None else groups.detach().reshape(-1).to(self.device, torch.long)
        emb = embeddings.detach().to(self.device)
        self.embeddings = emb.float().contiguous() if normalized else l2_normalize(emb)
        self.stamps = torch.full((n,), stamp, dtype=torch.long)

    def write(self, rows: Tensor, embeddings: Tensor, stamp: int) -> None:
        """Overwrite ``rows`` (n,) CPU row numbers with ``embeddings`` (n, D), normalised here."""
        if embeddings.shape != (rows.numel(), self.dim):
            raise ValueError(f"embeddings must be ({rows.numel()}, {self.dim}), got {tuple(embeddings.shape)}")
        self.embeddings.index_copy_(0, rows.to(self.device), l2_normalize(embeddings.detach().to(self.device)))
        self.stamps[rows] = stamp

    def rows_of(self, ids: Tensor) -> Tensor:
        """External ids (any shape) -> CPU row numbers, -1 where unknown or negative."""
        ids = ids.detach().to("cpu", torch.long)
        n = len(self)
        if n == 0:
            return torch.full_like(ids, -1)
        if self.ids is None:
            return torch.where((ids >= 0) & (ids < n), ids, -1)
        pos = torch.searchsorted(self._sorted_ids, ids).clamp(max=n - 1)
        return torch.where(self._sorted_ids[pos] == ids, self._order[pos], -1)

    def ids_of(self, rows: Tensor) -> Tensor:
        """CPU row numbers (any shape, -1 allowed) -> external ids, -1 where the row is -1."""
        ids = rows if self.ids is None else self.ids[rows.clamp(min=0)]
        return torch.where(rows >= 0, ids, -1)

    def state_dict(self) -> dict[str, Tensor]:
        empty = torch.empty(0, dtype=torch.long)
        return {"embeddings": self.embeddings.cpu(), "ids": empty if self.ids is None else self.ids.clone(),
                "text_group": empty if self.groups is None else self.groups.cpu(), "stamps": self.stamps.clone()}
