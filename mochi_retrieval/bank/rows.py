"""The bank's rows: unit embeddings (N, D), their external ids and the id -> row map, the group of each row
(false-negative key) and the step at which each row was last embedded (its staleness).

Sharded over W processes, process r owns the rows ``r, r + W, r + 2W, ...`` (strided, so that a rolling slice
in row order is spread evenly over the processes): it holds their embeddings and stamps, (ceil((N - r) / W), D)
and (ceil((N - r) / W),), at local positions ``row // W``. The ids and groups (N,) are small and stay
replicated: every process resolves ids to rows and applies the exclusions of every query.

With ``rows_dir`` the embeddings live in a memory-mapped file there instead of the process's memory (an
unlinked temporary file: the disk space goes with the process): pages are read when touched and the OS keeps
what fits. Searched through a code index with re-ranking, a step reads only its shortlisted rows."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..search import l2_normalize

NEVER = -1  # stamp of a row never embedded by the model (an image bank's random start)


class BankRows:
    """Row storage of a bank. ``embeddings`` is the source of truth; indexes are caches of it.

    Attributes:
        embeddings: (n, D) float32 unit rows this process holds (n = N unsharded), on ``device``.
        ids: (N,) distinct non-negative external ids, or None (ids are row numbers).
        groups: (N,) long group of each row (equal = a false negative of each other), or None.
        stamps: (n,) long, the step at which each held row was last written (``NEVER`` = not by the model).
        world, rank: the layout: process ``rank`` of ``world`` holds rows ``rank::world``.
    """

    def __init__(self, device: torch.device | str = "cpu", rows_dir: str | Path | None = None) -> None:
        self.device = torch.device(device)
        if rows_dir is not None and self.device.type != "cpu":
            raise ValueError(f"bank.rows_dir keeps the rows in a file mapped into CPU memory; the rows here live on "
                             f"{self.device} (bank.backend='torch' on a GPU): use bank.backend='faiss'")
        self.rows_dir = None if rows_dir is None else Path(rows_dir)
        self.world, self.rank, self.total = 1, 0, 0
        self.embeddings = torch.empty(0, 0)
        self.ids: Tensor | None = None
        self.groups: Tensor | None = None
        self.stamps = torch.empty(0, dtype=torch.long)
        self._sorted_ids: Tensor | None = None
        self._order: Tensor | None = None

    def __len__(self) -> int:
        """N, the rows of the whole bank (over every shard)."""
        return self.total

    def owned(self, rows: Tensor) -> Tensor:
        """Bool mask shaped like ``rows`` (global row numbers, -1 allowed): the rows this process holds."""
        return (rows >= 0) & (rows % self.world == self.rank)

    def local(self, rows: Tensor) -> Tensor:
        """Global rows this process holds -> their positions in ``embeddings``."""
        return rows // self.world

    def global_rows(self, local: Tensor) -> Tensor:
        """Positions in ``embeddings`` (-1 allowed) -> global row numbers (-1 stays -1)."""
        return torch.where(local >= 0, local * self.world + self.rank, -1)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def replace(self, embeddings: Tensor, ids: Tensor | None, groups: Tensor | None, stamp: int,
                normalized: bool = False, layout: tuple[int, int, int] | None = None) -> None:
        """All rows at once: embeddings (n, D), ids (N,) or None, groups (N,) or None (keeps the current
        groups when they still have N rows). ``layout`` = (world, rank, N) of a sharded bank (embeddings then
        hold rows ``rank::world``); None = one process holds all N = n rows."""
        world, rank, n = layout if layout is not None else (1, 0, embeddings.shape[0])
        if embeddings.dim() != 2 or (world == 1 and embeddings.shape[0] == 0) or n == 0:
            raise ValueError(f"embeddings must be a non-empty (N, D) tensor, got shape {tuple(embeddings.shape)}")
        held = len(range(rank, n, world))
        if embeddings.shape[0] != held:
            raise ValueError(f"a bank of {n} rows sharded over {world} processes holds rows {rank}::{world} on "
                             f"process {rank}: {held} rows, got embeddings of shape {tuple(embeddings.shape)}")
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
        self.world, self.rank, self.total = world, rank, n
        if self.rows_dir is not None:
            self.embeddings = self._on_disk(embeddings.detach(), normalized)
        else:
            emb = embeddings.detach().to(self.device)
            self.embeddings = emb.float().contiguous() if normalized else l2_normalize(emb)
        self.stamps = torch.full((held,), stamp, dtype=torch.long)

    def _on_disk(self, embeddings: Tensor, normalized: bool, chunk: int = 65_536) -> Tensor:
        """(n, D) float32 unit rows in a new memory-mapped file under ``rows_dir``, filled ``chunk`` rows at a
        time (no second copy in memory). The file is unlinked at once: the mapping keeps it until the tensor is
        freed, and the previous rows' file (still mapped by whoever holds those rows) is left alone."""
        try:
            self.rows_dir.mkdir(parents=True, exist_ok=True)
            handle, path = tempfile.mkstemp(prefix="bank-rows-", suffix=".f32", dir=self.rows_dir)
        except OSError as err:
            raise ValueError(f"bank.rows_dir={str(self.rows_dir)!r}: cannot create the rows' file there ({err})") \
                from None
        n, dim = embeddings.shape
        try:
            mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=(max(n, 1), dim))[:n]
        finally:
            os.close(handle)
            os.unlink(path)
        out = torch.from_numpy(mapped)
        for start in range(0, n, chunk):
            part = embeddings[start:start + chunk].to("cpu", torch.float32)
            out[start:start + chunk] = part if normalized else l2_normalize(part)
        return out

    def write(self, rows: Tensor, embeddings: Tensor, stamp: int) -> Tensor:
        """Overwrite ``rows`` (n,) CPU global row numbers with ``embeddings`` (n, D), normalised here; a shard
        writes those it holds. Returns the (m,) local positions written."""
        if embeddings.shape != (rows.numel(), self.dim):
            raise ValueError(f"embeddings must be ({rows.numel()}, {self.dim}), got {tuple(embeddings.shape)}")
        mine = self.owned(rows)
        if self.world > 1:
            rows, embeddings = rows[mine], embeddings[mine.to(embeddings.device)]
        local = self.local(rows)
        self.embeddings.index_copy_(0, local.to(self.device), l2_normalize(embeddings.detach().to(self.device)))
        self.stamps[local] = stamp
        return local

    def rows_of(self, ids: Tensor) -> Tensor:
        """External ids (any shape) -> CPU row numbers, -1 where unknown or negative."""
        ids = ids.detach().to("cpu", torch.long)
        n = self.total
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
        """The held rows (embeddings, stamps) and the replicated tables (ids, text_group)."""
        empty = torch.empty(0, dtype=torch.long)
        return {"embeddings": self.embeddings.cpu(), "ids": empty if self.ids is None else self.ids.clone(),
                "text_group": empty if self.groups is None else self.groups.cpu(), "stamps": self.stamps.clone()}
