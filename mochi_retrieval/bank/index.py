"""The bank's exact inner-product index over its rows: torch (``q @ E.T``, the oracle) or a FAISS flat index
(CPU, or GPU through faiss-gpu). The FAISS index is a cache of the rows, rebuilt lazily on the first search
after a write: for a flat index that is one copy of N x D floats, cheaper than the search it precedes, and it
works the same on CPU and GPU indexes (GPU flat indexes cannot remove ids), with ids staying row numbers."""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..optional import import_faiss
from ..search import FAISS_GPU_MAX_K, faiss_num_gpus, search

logger = logging.getLogger(__name__)


class FlatIndex:
    """Exact search over a (N, D) tensor of unit rows.

    Args:
        backend: "faiss" or "torch".
        use_gpu: FAISS on the GPU (faiss-gpu), or torch on CUDA.
    """

    def __init__(self, backend: str, use_gpu: bool) -> None:
        self.backend, self.use_gpu = backend, use_gpu
        self._index = None
        self.dirty = True

    def search(self, embeddings: Tensor, queries: Tensor, kk: int) -> tuple[Tensor, Tensor]:
        """(b, D) unit queries -> scores, rows (b, kk) on the CPU, best first."""
        if self.backend == "torch":
            s, i = search(queries.to(embeddings.device), embeddings, kk, backend="torch")
            return s.cpu(), i.cpu()
        if self.use_gpu and kk > FAISS_GPU_MAX_K:  # GPU cap; search.py runs it on a CPU flat index
            return search(queries.cpu(), embeddings, kk, backend="faiss", use_gpu=False)
        self._build(embeddings)
        s, i = self._index.search(queries.detach().to("cpu", torch.float32).contiguous().numpy(), kk)
        return torch.from_numpy(s), torch.from_numpy(i)

    def _build(self, embeddings: Tensor) -> None:
        if not self.dirty:
            return
        faiss = import_faiss()
        dim = embeddings.shape[1]
        if self._index is None or self._index.d != dim:
            self._index = faiss.IndexFlatIP(dim)
            if self.use_gpu:
                self._index = self._to_gpu(faiss, self._index)
        self._index.reset()
        self._index.add(embeddings.cpu().numpy())
        self.dirty = False

    def _to_gpu(self, faiss, index):
        """One process with several GPUs: shard the index over all of them. Under DDP (one GPU per
        process): this process's GPU; every process holds the whole (replicated) bank."""
        from ..distributed import world_size

        if world_size() == 1 and faiss_num_gpus() > 1:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True
            logger.info("bank: sharding the index over %d GPUs", faiss_num_gpus())
            return faiss.index_cpu_to_all_gpus(index, co=options)
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()  # outlives the index
        return faiss.index_cpu_to_gpu(self._gpu_res, device, index)
