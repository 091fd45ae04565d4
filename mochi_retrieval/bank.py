"""FAISS hard-negative bank over a fixed corpus of document embeddings (ANCE style).

The bank holds the corpus embedded by the key encoder, (N, D), L2-normalised.
It is rebuilt every R steps with :meth:`FaissNegativeBank.refresh` and may be
patched in between with :meth:`update` (for example with each batch's keys).
Per query it returns candidate negatives: the top-k documents by inner product
after removing the query's positives and, optionally, every document whose
text is identical to a positive's (same ``text_group``), after skipping the
first ``skip_top`` survivors (rank window) and any survivor scoring above
``max_similarity`` (ceiling against likely false negatives).

The result is exact: the bank searches ``k + slack`` neighbours, filters them,
and searches again with twice as many for the queries left short, up to N.

Two backends give the same candidates (ties aside): ``"faiss"`` (a flat
inner-product index, on the GPU when asked for and available) and ``"torch"``
(exact ``q @ E.T`` via :func:`mochi_retrieval.search.search`, the test oracle).

Storage: the normalised matrix is kept as a torch tensor, the source of truth;
the FAISS index is a cache of it, rebuilt lazily on the first search after an
:meth:`update`. For a flat index that rebuild is one copy of N x D floats,
cheaper than the search it precedes, and it works the same on CPU and GPU
indexes (GPU flat indexes cannot remove ids), with ids staying row numbers.

Example::

    bank = FaissNegativeBank(device="auto")
    bank.refresh(doc_emb, text_group=groups)           # (N, D), (N,)
    idx, vecs = bank.candidates(q, 16, exclude=pos)    # (B, 16), (B, 16, D)
    out = contrastive_loss(q, k, (queue.negatives(), vecs), T, mochi=cfg)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from .errors import require
from .optional import import_faiss
from .search import FAISS_GPU_MAX_K, faiss_num_gpus, l2_normalize, search

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Exclude = Tensor | Sequence[set[int] | Sequence[int]] | None


@dataclass(frozen=True)
class BankSettings:
    """FAISS negative bank settings.

    Attributes:
        candidates: c, detached negatives per query (stored vectors, no gradient).
        mined_negatives: n, negatives per query whose texts are re-encoded with
            gradient (text models; taken before the c detached ones).
        exclude_family: exclude candidates from the family of a positive (text:
            same first paragraph), not only identical inputs.
        max_pos_ratio: text: skip candidates scoring above this share of the
            query's positive score, q.d > r * q.k (sentence-transformers'
            ``relative_margin`` is 1 - r); None = no relative ceiling.
        refresh_every: re-embed the whole bank every R forward calls (0 = only
            at the start of a run, after which the in-place updates keep it fresh;
            text models only: an image bank starts random and is kept by updates).
        update_with_keys: write each batch's document keys into the bank.
        skip_top: drop the first r candidates per query (rank window).
        max_similarity: drop candidates scoring above this (likely false negatives).
        backend, device: see :class:`FaissNegativeBank`.
        encode_batch_size: documents per forward pass during a refresh.
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

    def __post_init__(self) -> None:
        require(self.candidates >= 0, "candidates", ">= 0", self.candidates)
        require(self.mined_negatives >= 0, "mined_negatives", ">= 0", self.mined_negatives)
        require(self.max_pos_ratio is None or self.max_pos_ratio > 0, "max_pos_ratio", "> 0 or null",
                self.max_pos_ratio)
        require(self.candidates + self.mined_negatives >= 1, "candidates",
                ">= 1 unless mined_negatives > 0", self.candidates)
        require(self.refresh_every >= 0, "refresh_every", ">= 0", self.refresh_every)
        require(self.skip_top >= 0, "skip_top", ">= 0", self.skip_top)
        require(self.encode_batch_size >= 1, "encode_batch_size", ">= 1", self.encode_batch_size)
        require(self.max_similarity is None or -1.0 <= self.max_similarity <= 1.0, "max_similarity",
                "in [-1, 1] or null", self.max_similarity)


class FaissNegativeBank:
    """Candidate negatives per query from a refreshed corpus index.

    Args:
        backend: "faiss" (flat inner-product index) or "torch" (exact matmul).
        device: "cpu"; "cuda" (GPU, or CPU with a warning when none is usable);
            "auto" (GPU when usable, else CPU).
        slack: extra neighbours fetched in the first search on top of
            ``k + skip_top + positives``.
    """

    def __init__(self, backend: Literal["faiss", "torch"] = "faiss", device: Device = "cpu", slack: int = 32) -> None:
        if backend not in ("faiss", "torch"):
            raise ValueError(f"unknown bank backend {backend!r}; use 'faiss' or 'torch'")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown bank device {device!r}; use 'auto', 'cpu' or 'cuda'")
        self.backend, self.slack = backend, max(0, int(slack))
        self.use_gpu = self._resolve_gpu(backend, device)
        self.embeddings = torch.empty(0, 0)
        self.ids: Tensor | None = None  # (N,) external ids, None = row numbers
        self.text_group: Tensor | None = None  # (N,) equal value = identical text
        self._index = None
        self._dirty = True
        self.last_refresh_seconds = 0.0
        self.last_search_rounds = 0

    @staticmethod
    def _resolve_gpu(backend: str, device: str) -> bool:
        if device == "cpu":
            return False
        usable = faiss_num_gpus() > 0 if backend == "faiss" else torch.cuda.is_available()
        if not usable and device == "cuda":
            what = "the installed faiss sees no GPU (faiss-cpu, or no device)" if backend == "faiss" \
                else "torch sees no CUDA device"
            logger.warning("bank: GPU requested but %s; falling back to CPU", what)
        return usable

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def _store_device(self) -> torch.device:
        return torch.device("cuda" if self.use_gpu and self.backend == "torch" else "cpu")

    @torch.no_grad()
    def refresh(
        self, embeddings: Tensor, ids: Tensor | None = None, text_group: Tensor | None = None, *,
        _normalized: bool = False,
    ) -> None:
        """Replace the whole corpus and rebuild the index.

        Args:
            embeddings: (N, D) document embeddings; normalised and detached here.
            ids: (N,) distinct non-negative int ids used in ``exclude``,
                :meth:`update` and the returned indices; None = row numbers.
            text_group: (N,) ints, equal for identical texts (negative = in
                no group); None keeps the current groups if they still have
                N rows, else drops them.
        """
        start = time.perf_counter()
        if embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty (N, D) tensor, got shape {tuple(embeddings.shape)}")
        n = embeddings.shape[0]
        if ids is not None:
            ids = ids.detach().to("cpu", torch.long).reshape(-1)
            if ids.shape != (n,) or (ids < 0).any() or ids.unique().numel() != n:
                raise ValueError(f"ids must be {n} distinct non-negative ints, got shape {tuple(ids.shape)}")
            self._sorted_ids, self._order = ids.sort()
        if text_group is None and self.text_group is not None and self.text_group.shape == (n,):
            text_group = self.text_group
        if text_group is not None and text_group.reshape(-1).shape != (n,):
            raise ValueError(f"text_group must have shape ({n},), got {tuple(text_group.shape)}")
        self.ids = ids
        if text_group is not None:
            text_group = text_group.detach().reshape(-1).to(self._store_device, torch.long)
        self.text_group = text_group
        emb = embeddings.detach().to(self._store_device)
        self.embeddings = emb.float().contiguous() if _normalized else l2_normalize(emb)
        self._dirty = True
        self._build_index()
        self.last_refresh_seconds = time.perf_counter() - start
        logger.info("bank refreshed: %d x %d, %s on %s, %.3f s", n, self.dim, self.backend,
                    "GPU" if self.use_gpu else "CPU", self.last_refresh_seconds)

    @torch.no_grad()
    def update(self, doc_indices: Tensor, embeddings: Tensor) -> None:
        """Replace rows in place: doc_indices (n,) ids, embeddings (n, D). The index is rebuilt lazily."""
        self._check_ready()
        doc_indices = doc_indices.reshape(-1)
        if embeddings.shape != (doc_indices.numel(), self.dim):
            raise ValueError(f"embeddings must be ({doc_indices.numel()}, {self.dim}), got {tuple(embeddings.shape)}")
        rows = self._rows(doc_indices)
        if (rows < 0).any():
            raise ValueError(f"update names ids not in the bank: {doc_indices.cpu()[rows < 0][:5].tolist()}")
        dev = self.embeddings.device
        self.embeddings.index_copy_(0, rows.to(dev), l2_normalize(embeddings.detach().to(dev)))
        self._dirty = True

    def add(self, keys: Tensor, ids: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Negative-source protocol: write keys (n, D) to the rows of ``ids`` (n,); see :meth:`update`."""
        if ids is None:
            raise ValueError("a FaissNegativeBank needs the ids of the keys it is given (add(keys, ids))")
        self.update(ids, keys)

    def contains(self, ids: Tensor) -> Tensor:
        """Bool tensor shaped like ``ids``: which ids the bank holds (on the CPU)."""
        return self._rows(ids) >= 0

    def _check_ready(self) -> None:
        if len(self) == 0:
            raise RuntimeError("the bank is empty: call refresh(embeddings) first")

    def _rows(self, ids: Tensor) -> Tensor:
        """External ids (any shape) -> CPU row numbers, -1 where unknown or negative."""
        ids = ids.detach().to("cpu", torch.long)
        n = len(self)
        if self.ids is None:
            return torch.where((ids >= 0) & (ids < n), ids, -1)
        pos = torch.searchsorted(self._sorted_ids, ids).clamp(max=n - 1)
        return torch.where(self._sorted_ids[pos] == ids, self._order[pos], -1)

    def _build_index(self) -> None:
        if self.backend != "faiss" or not self._dirty:
            return
        faiss = import_faiss()
        if self._index is None or self._index.d != self.dim:
            self._index = faiss.IndexFlatIP(self.dim)
            if self.use_gpu:
                self._index = self._to_gpu(faiss, self._index)
        self._index.reset()
        self._index.add(self.embeddings.numpy())
        self._dirty = False

    def _to_gpu(self, faiss, index):
        """One process with several GPUs: shard the index over all of them. Under DDP (one GPU per
        process): this process's GPU; every process holds the whole (replicated) bank."""
        from .distributed import world_size

        if world_size() == 1 and faiss_num_gpus() > 1:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True
            logger.info("bank: sharding the index over %d GPUs", faiss_num_gpus())
            return faiss.index_cpu_to_all_gpus(index, co=options)
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()  # outlives the index
        return faiss.index_cpu_to_gpu(self._gpu_res, device, index)

    def _search(self, queries: Tensor, kk: int) -> tuple[Tensor, Tensor]:
        """(b, D) unit queries -> scores, rows (b, kk) on the CPU, best first."""
        if self.backend == "torch":
            s, i = search(queries.to(self.embeddings.device), self.embeddings, kk, backend="torch")
            return s.cpu(), i.cpu()
        if self.use_gpu and kk > FAISS_GPU_MAX_K:  # GPU cap; search.py runs it on a CPU flat index
            return search(queries.cpu(), self.embeddings, kk, backend="faiss", use_gpu=False)
        self._build_index()
        s, i = self._index.search(queries.detach().to("cpu", torch.float32).contiguous().numpy(), kk)
        return torch.from_numpy(s), torch.from_numpy(i)

    def _exclusion_rows(self, exclude: Exclude, b: int) -> Tensor:
        """``exclude`` -> (b, E) CPU row numbers, -1 padding."""
        if exclude is None:
            return torch.full((b, 0), -1, dtype=torch.long)
        if isinstance(exclude, Tensor):
            if exclude.dim() != 2 or exclude.shape[0] != b:
                raise ValueError(f"exclude tensor must be (B={b}, E), got shape {tuple(exclude.shape)}")
            return self._rows(exclude)
        if len(exclude) != b:
            raise ValueError(f"exclude must hold one set per query: {len(exclude)} for B={b} queries")
        width = max((len(e) for e in exclude), default=0)
        pad = torch.full((b, width), -1, dtype=torch.long)
        for r, e in enumerate(exclude):
            if len(e):
                pad[r, : len(e)] = torch.tensor(sorted(e), dtype=torch.long)
        return self._rows(pad)

    @torch.no_grad()
    def candidates(
        self,
        queries: Tensor,
        k: int,
        *,
        exclude: Exclude = None,
        exclude_text_dupes: bool = True,
        skip_top: int = 0,
        max_similarity: float | Tensor | None = None,
        allow_fewer: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Top-k negatives per query after exclusions, rank window and ceiling.

        Args:
            queries: (B, D) query embeddings (normalised here for the search).
            k: candidates per query.
            exclude: the query's positives: a list of B sets of ids, or a
                (B, E) long tensor of ids padded with -1.
            exclude_text_dupes: also drop documents whose ``text_group``
                equals that of an excluded document (needs text groups).
            skip_top: drop the first ``skip_top`` survivors (rank window).
            max_similarity: drop survivors with q . d above this value: a float,
                or a (B,) tensor of per-query ceilings (e.g. 0.95 x the positive's score).
            allow_fewer: a query with fewer than k documents left gets what is
                left, padded with id -1 and zero vectors, instead of an error.
        Returns:
            indices: (B, k) long ids, best first, on the queries' device.
            vectors: (B, k, D) float32 unit embeddings, detached, same device.
        Raises:
            ValueError: ``k + skip_top`` exceeds N, or (unless ``allow_fewer``)
                some query has fewer than that many documents left (both numbers
                in the message).
        """
        self._check_ready()
        n, b = len(self), queries.shape[0]
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got shape {tuple(queries.shape)}")
        if k < 1 or skip_top < 0:
            raise ValueError(f"need k >= 1 and skip_top >= 0, got k={k}, skip_top={skip_top}")
        if k + skip_top > n:
            raise ValueError(f"bank asked for {k + skip_top} candidates per query (k={k}, skip_top={skip_top}) "
                             f"but the corpus holds only {n} documents")
        q = l2_normalize(queries.detach())
        excl = self._exclusion_rows(exclude, b)
        groups = self.text_group.cpu() if exclude_text_dupes and self.text_group is not None else None
        excl_groups = None if groups is None else torch.where(excl >= 0, groups[excl.clamp(min=0)], -1)
        ceiling = None if max_similarity is None else \
            torch.as_tensor(max_similarity, dtype=torch.float32).detach().cpu().reshape(-1).expand(b)
        out = torch.full((b, k), -1, dtype=torch.long)
        todo = torch.arange(b)
        kk, self.last_search_rounds = min(n, k + skip_top + excl.shape[1] + self.slack), 0
        while todo.numel():
            self.last_search_rounds += 1
            scores, rows = self._search(q[todo], kk)
            left, picked = self._select(scores, rows, excl[todo], groups, excl_groups, todo, k, skip_top,
                                        None if ceiling is None else ceiling[todo])
            done = left >= k
            out[todo[done]] = picked[done]
            if kk == n and not done.all() and allow_fewer:  # what is left, -1 padded
                out[todo[~done]] = picked[~done]
                break
            if kk == n and not done.all():
                bad = int((~done).nonzero()[0])
                raise ValueError(
                    f"bank asked for k={k} candidates per query but query {int(todo[bad])} has only {int(left[bad])} "
                    f"left after its exclusions, skip_top={skip_top} and the similarity ceiling "
                    f"(corpus holds {n} documents)")
            todo, kk = todo[~done], min(n, 2 * kk)
        missing = out < 0
        vectors = self.embeddings[out.clamp(min=0).to(self.embeddings.device)].to(queries.device, torch.float32)
        ids = out if self.ids is None else self.ids[out.clamp(min=0)]
        if missing.any():
            ids = ids.masked_fill(missing, -1)
            vectors = vectors.masked_fill(missing.to(vectors.device).unsqueeze(-1), 0.0)
        return ids.to(queries.device), vectors

    @staticmethod
    def _select(scores: Tensor, rows: Tensor, excl: Tensor, groups: Tensor | None, excl_groups: Tensor | None,
                todo: Tensor, k: int, skip_top: int, ceiling: Tensor | None) -> tuple[Tensor, Tensor]:
        """Filter one search round. scores, rows: (b, kk) -> survivors left after the window (b,), picked (b, k).

        ``left >= k`` means the row is complete (its picks are exact)."""
        keep = ~(rows.unsqueeze(2) == excl.unsqueeze(1)).any(2)
        if excl_groups is not None:
            eg = excl_groups[todo].unsqueeze(1)  # (b, 1, E), -1 = padding or "no group"
            keep &= ~((groups[rows].unsqueeze(2) == eg) & (eg >= 0)).any(2)
        rank = keep.cumsum(1)  # 1-based rank among survivors
        start = torch.full((rows.shape[0],), skip_top, dtype=torch.long)
        if ceiling is not None:  # scores are sorted, so those above the ceiling are a prefix
            start = torch.maximum(start, (keep & (scores > ceiling.view(-1, 1))).sum(1))
        chosen = keep & (rank > start.unsqueeze(1)) & (rank <= (start + k).unsqueeze(1))
        picked = torch.full((rows.shape[0], k), -1, dtype=torch.long)
        r, c = chosen.nonzero(as_tuple=True)
        picked[r, (rank[r, c] - start[r] - 1)] = rows[r, c]
        return rank[:, -1] - start, picked

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (``torch.load(..., weights_only=True)`` safe): embeddings, ids, text groups."""
        empty = torch.empty(0, dtype=torch.long)
        return {
            "embeddings": self.embeddings.cpu(),
            "ids": empty if self.ids is None else self.ids.clone(),
            "text_group": empty if self.text_group is None else self.text_group.cpu(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a :meth:`state_dict` (rebuilds the index)."""
        missing = {"embeddings", "ids", "text_group"} - set(state)
        if missing:
            raise KeyError(f"bank state_dict lacks {sorted(missing)}")
        self.text_group = None
        ids, groups = state["ids"], state["text_group"]
        self.refresh(state["embeddings"], ids if ids.numel() else None, groups if groups.numel() else None,
                     _normalized=True)  # stored rows are unit already: keep them bit for bit
