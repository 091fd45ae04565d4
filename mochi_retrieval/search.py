"""Exact top-k inner-product search over embeddings, chunked to bound memory.

Two backends share one signature and return the same neighbours (ties aside):

- ``"torch"``: ``queries @ corpus.T`` plus ``topk``, on the queries' device
  (or ``device``). It is the oracle the FAISS path is tested against, and the
  fast path when the embeddings already live on a GPU.
- ``"faiss"``: a flat inner-product index (``IndexFlatIP``); on the GPU
  (``GpuIndexFlatIP``) when the installed faiss has GPU support and
  ``faiss.get_num_gpus() > 0``. FAISS GPU search caps k at 2048; above that
  the search runs on a CPU flat index instead (still exact), with a log line.

Both walk over query chunks and corpus chunks and merge the per-chunk top-k,
so neither the full (Q, N) score matrix nor a second copy of a huge corpus is
ever held: peak extra memory is about ``query_chunk x corpus_chunk`` scores
(torch) or one corpus chunk (faiss).

Inputs are expected to be L2-normalised already when cosine similarity is
meant (see :func:`l2_normalize`); search itself is plain inner product.

Example::

    q = l2_normalize(torch.randn(100, 64)); c = l2_normalize(torch.randn(10_000, 64))
    scores, idx = search(q, c, k=10)      # (100, 10) each, best first
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .optional import faiss_available, import_faiss

logger = logging.getLogger(__name__)

Backend = Literal["auto", "faiss", "torch"]

#: FAISS GPU indexes refuse k (and nprobe) above this value.
FAISS_GPU_MAX_K = 2048

_DEFAULT_CHUNKS = {"torch": (2048, 65_536), "faiss": (16_384, 1 << 20)}
_gpu_resources = None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm, as float32. x: (N, D) -> (N, D)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp(min=eps)


def faiss_num_gpus() -> int:
    """Number of GPUs the installed faiss can use (0 for faiss-cpu or no faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_backend(backend: Backend, queries: Tensor) -> str:
    """The backend ``"auto"`` picks: FAISS on GPU if available, torch for tensors
    already on an accelerator, else FAISS on CPU (torch when faiss is missing)."""
    if backend in ("faiss", "torch"):
        return backend
    if backend != "auto":
        raise ValueError(f"unknown search backend {backend!r}; use 'auto', 'faiss' or 'torch'")
    if faiss_num_gpus() > 0:
        return "faiss"
    if queries.device.type != "cpu" or not faiss_available():
        return "torch"
    return "faiss"


def _merge(
    best_s: Tensor | None, best_i: Tensor | None, s: Tensor, i: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge a chunk's candidates (Q, k') into the running best (Q, k)."""
    if best_s is None:
        return s, i
    all_s = torch.cat([best_s, s], 1)
    all_i = torch.cat([best_i, i], 1)
    top_s, pos = all_s.topk(min(k, all_s.shape[1]), dim=1)
    return top_s, all_i.gather(1, pos)


def _torch_search(
    queries: Tensor, corpus: Tensor, k: int, q_chunk: int, c_chunk: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    out_s, out_i = [], []
    for q0 in range(0, len(queries), q_chunk):
        q = queries[q0 : q0 + q_chunk].to(device, torch.float32)
        best_s = best_i = None
        for c0 in range(0, len(corpus), c_chunk):
            c = corpus[c0 : c0 + c_chunk].to(device, torch.float32)
            s, i = (q @ c.T).topk(min(k, len(c)), dim=1)
            best_s, best_i = _merge(best_s, best_i, s, i + c0, k)
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


def _faiss_index(faiss, dim: int, use_gpu: bool):
    global _gpu_resources
    if not use_gpu:
        return faiss.IndexFlatIP(dim)
    if _gpu_resources is None:  # expensive to create; one per process
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.GpuIndexFlatIP(_gpu_resources, dim)


def _as_numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def _faiss_search(
    queries: Tensor, corpus: Tensor, k: int, q_chunk: int, c_chunk: int, use_gpu: bool
) -> tuple[Tensor, Tensor]:
    faiss = import_faiss()
    if use_gpu and k > FAISS_GPU_MAX_K:
        logger.info("k=%d exceeds the FAISS GPU cap of %d; searching a CPU flat index", k, FAISS_GPU_MAX_K)
        use_gpu = False
    index = _faiss_index(faiss, corpus.shape[1], use_gpu)
    best_s = [None] * ((len(queries) + q_chunk - 1) // q_chunk)
    best_i = list(best_s)
    for c0 in range(0, len(corpus), c_chunk):
        index.reset()
        chunk = _as_numpy(corpus[c0 : c0 + c_chunk])
        index.add(chunk)
        kk = min(k, len(chunk))
        for j, q0 in enumerate(range(0, len(queries), q_chunk)):
            s, i = index.search(_as_numpy(queries[q0 : q0 + q_chunk]), kk)
            best_s[j], best_i[j] = _merge(best_s[j], best_i[j], torch.from_numpy(s), torch.from_numpy(i) + c0, k)
    index.reset()
    return torch.cat(best_s), torch.cat(best_i)


def search(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    backend: Backend = "auto",
    query_chunk: int | None = None,
    corpus_chunk: int | None = None,
    device: torch.device | str | None = None,
    use_gpu: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k corpus rows by inner product for every query.

    Args:
        queries: (Q, D) embeddings (L2-normalised for cosine search).
        corpus: (N, D) embeddings, same D.
        k: neighbours per query, 1 <= k <= N.
        backend: "torch", "faiss" or "auto" (see :func:`resolve_backend`).
        query_chunk: queries per block (default 2048 torch, 16384 faiss).
        corpus_chunk: corpus rows per block (default 65536 torch, 2**20 faiss).
        device: torch backend only; where the products run (default: the
            queries' device). Results come back on that device.
        use_gpu: faiss backend only; None means "if faiss sees a GPU".
    Returns:
        scores: (Q, k) float32 inner products, descending per row.
        indices: (Q, k) int64 corpus row indices (torch results on ``device``,
            faiss results on the CPU).
    Raises:
        ValueError: k is out of range (the message names k and N), the
            dimensions differ, or the backend is unknown.
    """
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"expected queries (Q, D) and corpus (N, D), "
                         f"got {tuple(queries.shape)} and {tuple(corpus.shape)}")
    n = corpus.shape[0]
    if k > n:
        raise ValueError(f"k={k} is larger than the corpus (N={n} documents)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    name = resolve_backend(backend, queries)
    dq, dc = _DEFAULT_CHUNKS[name]
    q_chunk, c_chunk = query_chunk or dq, corpus_chunk or dc
    if len(queries) == 0:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
    if name == "torch":
        dev = torch.device(device) if device is not None else queries.device
        return _torch_search(queries, corpus, k, q_chunk, c_chunk, dev)
    gpu = faiss_num_gpus() > 0 if use_gpu is None else use_gpu
    return _faiss_search(queries, corpus, k, q_chunk, c_chunk, gpu)
