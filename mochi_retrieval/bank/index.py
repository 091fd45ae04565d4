"""The bank's inner-product index over the rows it holds: exact (torch ``q @ E.T``, the oracle; FAISS flat) or
any FAISS ``index_factory`` string (``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF1024,PQ32"``, ``"SQfp16"``, ...).

- ``"Flat"`` on the CPU searches the rows in place (``faiss.knn``): no copy of the N x D floats, nothing to
  rebuild after a write. On the GPU it is a GPU flat index, re-filled lazily on the first search after writes.
- Any other string is a cache of the rows in FAISS's codes: trained (when the type needs it) and filled at
  each :meth:`BankIndex.reset` (a refresh), and patched for the rows written since: in place for IVF types,
  by re-adding every row (no retraining) for the others (HNSW cannot remove).
- ``rerank`` = F > 1 (code indexes): the codes shortlist F x kk rows per query and the rows' exact scores
  order them (:func:`rerank_exact`): the recall of the lists, at the memory of the codes, when the rows are
  memory-mapped from disk (``BankRows(rows_dir=...)``) and only the shortlisted ones are read.

Row numbers are the positions in the rows tensor; a sharded bank maps them to global rows itself.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..optional import import_faiss
from ..search import FAISS_GPU_MAX_K, faiss_num_gpus, search

logger = logging.getLogger(__name__)


def check_index_spec(spec: str, search_params: str | None = None) -> None:
    """Raise a ValueError naming ``spec`` (or ``search_params``) when FAISS cannot build that index."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"bank.index must be a FAISS index_factory string such as 'Flat', got {spec!r}")
    if spec == "Flat" and not search_params:
        return
    faiss = import_faiss()
    index, error = None, None
    for dim in (384, 768, 1024, 960, 512, 256, 128, 64):  # PQ / SQ codes need a dimension they divide
        try:
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
            break
        except RuntimeError as err:
            error = err
    if index is None:
        raise ValueError(f"bank.index={spec!r} is not a FAISS index_factory string FAISS can build "
                         f"({_first_line(error)})")
    if search_params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, search_params)
        except RuntimeError as err:
            raise ValueError(f"bank.search_params={search_params!r} does not apply to bank.index={spec!r} "
                             f"({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Error" in line or "error" in line:
            return line.strip()[:200]
    return (lines[-1].strip() if lines else type(err).__name__)[:200]


class BankIndex:
    """Inner-product search over a (n, D) tensor of unit rows.

    Args:
        backend: "faiss" or "torch" (exact, ``"Flat"`` only).
        use_gpu: FAISS on the GPU (faiss-gpu), or torch on CUDA.
        spec: a FAISS ``index_factory`` string; "Flat" = exact.
        search_params: a ``faiss.ParameterSpace`` string, e.g. "nprobe=64" or "efSearch=128"; None = defaults.
        rerank: F > 1: the index shortlists F times the rows asked for and exact scores over the rows order
            them; 1 = the index's own scores (an approximate index's scores are approximate).
    """

    def __init__(self, backend: str, use_gpu: bool, spec: str = "Flat", search_params: str | None = None,
                 rerank: int = 1) -> None:
        if backend == "torch" and spec != "Flat":
            raise ValueError(f"bank.index={spec!r} needs bank.backend='faiss' (the torch backend is the exact "
                             "oracle: bank.index='Flat')")
        if not isinstance(rerank, int) or rerank < 1:
            raise ValueError(f"bank.rerank must be an int >= 1 (1 = off), got {rerank!r}")
        check_index_spec(spec, search_params)
        self.backend, self.use_gpu, self.spec, self.search_params = backend, use_gpu, spec, search_params
        self.rerank = rerank
        self._index = None
        self._full = True  # every row must be (re)added (a refresh): retrain, refill
        self._changed: list[Tensor] = []  # rows written since the last fill

    @property
    def exact(self) -> bool:
        return self.spec == "Flat"

    def reset(self) -> None:
        """All rows replaced (a refresh): the next search retrains (where the type needs it) and refills."""
        self._full, self._changed = True, []

    def changed(self, rows: Tensor) -> None:
        """Rows (m,) overwritten in place: the next search updates them in the index."""
        if rows.numel() and not self._full:
            self._changed.append(rows.detach().to("cpu", torch.long).reshape(-1))

    def search(self, embeddings: Tensor, queries: Tensor, kk: int) -> tuple[Tensor, Tensor]:
        """(b, D) unit queries -> scores, rows (b, kk) on the CPU, best first (-1 rows past the index's
        results); ``kk`` at most the number of rows."""
        if self.backend == "torch":
            s, i = search(queries.to(embeddings.device), embeddings, kk, backend="torch")
            return s.cpu(), i.cpu()
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.exact and not self.use_gpu:  # in place: no copy of the rows, nothing to rebuild
            faiss = import_faiss()
            s, i = faiss.knn(q, embeddings.detach().cpu().numpy(), kk, metric=faiss.METRIC_INNER_PRODUCT)
            return torch.from_numpy(s), torch.from_numpy(i)
        if self.exact and kk > FAISS_GPU_MAX_K:  # GPU cap; search.py runs it on a CPU flat index
            return search(queries.cpu(), embeddings, kk, backend="faiss", use_gpu=False)
        self._update(embeddings)
        if self.rerank > 1 and not self.exact:
            _, short = self._index.search(q, min(embeddings.shape[0], kk * self.rerank))
            return rerank_exact(queries.detach().cpu().float(), embeddings, torch.from_numpy(short), kk)
        s, i = self._index.search(q, kk)
        return torch.from_numpy(s), torch.from_numpy(i)

    # ------------------------------------------------------------------ build
    def _update(self, embeddings: Tensor) -> None:
        if self._full or self._index is None:
            self._build(embeddings)
            return
        if not self._changed:
            return
        rows = torch.cat(self._changed).unique()
        self._changed = []
        faiss = import_faiss()
        x = embeddings.detach().cpu().numpy()
        if self._ivf(faiss) is not None:  # in place: remove the rows' old codes, add the new ones
            ids = rows.numpy().astype("int64")
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._index.add_with_ids(x[ids], ids)
        else:  # no removal (HNSW, PQ, SQ): every row again, same training
            self._index.reset()
            self._add_all(x)

    def _ivf(self, faiss):
        try:
            return faiss.extract_index_ivf(self._index)
        except (RuntimeError, AttributeError):
            return None

    def _build(self, embeddings: Tensor) -> None:
        faiss = import_faiss()
        x = embeddings.detach().cpu().contiguous().numpy()
        n, dim = x.shape
        try:
            index = faiss.index_factory(dim, self.spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"bank.index={self.spec!r} cannot index {dim}-dimensional rows "
                             f"({_first_line(err)})") from None
        if not index.is_trained:
            need = _training_rows(faiss, index)
            if n < need:
                raise ValueError(f"bank.index={self.spec!r} needs at least {need} rows to train; this bank (shard) "
                                 f"holds {n}: use a smaller index (fewer lists or PQ bits) or bank.index='Flat'")
            try:
                index.train(x)
            except RuntimeError as err:
                raise ValueError(f"bank.index={self.spec!r}: training on {n} rows failed "
                                 f"({_first_line(err)})") from None
        if self.search_params:
            faiss.ParameterSpace().set_index_parameters(index, self.search_params)
        if self.use_gpu:
            index = self._to_gpu(faiss, index)
        self._index, self._full, self._changed = index, False, []
        self._add_all(x)

    def _add_all(self, x) -> None:
        if self._ivf(import_faiss()) is not None:
            self._index.add_with_ids(x, torch.arange(x.shape[0]).numpy())
        else:
            self._index.add(x)

    def _to_gpu(self, faiss, index):
        """One process with several GPUs: shard the index over all of them. Under DDP (one GPU per
        process): this process's GPU. A type FAISS has no GPU version of (HNSW) stays on the CPU."""
        from ..distributed import world_size

        try:
            if world_size() == 1 and faiss_num_gpus() > 1:
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True
                logger.info("bank: sharding the index over %d GPUs", faiss_num_gpus())
                return faiss.index_cpu_to_all_gpus(index, co=options)
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()  # outlives the index
            return faiss.index_cpu_to_gpu(self._gpu_res, device, index)
        except RuntimeError as err:
            logger.warning("bank.index=%r has no GPU version in FAISS (%s): searching on the CPU", self.spec,
                           _first_line(err))
            return index

    def nbytes(self) -> int:
        """Bytes of the index's own storage beyond the rows (0 for the in-place CPU flat search)."""
        if self._index is None or (self.exact and not self.use_gpu):
            return 0
        faiss = import_faiss()
        try:
            return int(faiss.serialize_index(self._index).nbytes)
        except RuntimeError:  # a GPU index: its size on the CPU
            return int(faiss.serialize_index(faiss.index_gpu_to_cpu(self._index)).nbytes)


MISSING_SCORE = float(torch.finfo(torch.float32).min)  # FAISS's score for an empty slot (id -1), inner product


def rerank_exact(queries: Tensor, rows: Tensor, shortlist: Tensor, kk: int,
                 chunk_floats: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """Order an index's shortlist by exact scores: (b, D) queries, (n, D) rows, (b, m) shortlisted row numbers
    (-1 = empty) -> scores, rows (b, kk) on the CPU, best first, -1 (score ``MISSING_SCORE``) past the
    shortlist. Only the shortlisted rows are read (a memory-mapped bank reads b x m rows from disk), in
    chunks of queries holding at most ``chunk_floats`` floats."""
    b, m = shortlist.shape
    scores, found = torch.full((b, kk), MISSING_SCORE), torch.full((b, kk), -1, dtype=torch.long)
    step = max(1, chunk_floats // max(1, m * rows.shape[1]))
    for start in range(0, b, step):
        ids = shortlist[start:start + step]
        picked = rows[ids.clamp(min=0).reshape(-1)].to("cpu", torch.float32).reshape(*ids.shape, -1)
        exact = torch.einsum("bd,bmd->bm", queries[start:start + step], picked).masked_fill(ids < 0, MISSING_SCORE)
        top = min(kk, m)
        s, order = exact.topk(top, dim=1)
        scores[start:start + step, :top] = s
        found[start:start + step, :top] = torch.where(s > MISSING_SCORE, ids.gather(1, order), -1)
    return scores, found


def _training_rows(faiss, index) -> int:
    """The fewest rows FAISS can train ``index`` on: the lists of an IVF, 2^bits for a (residual) PQ."""
    need = 1
    ivf = None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        pass
    if ivf is not None:
        need = max(need, ivf.nlist)
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else index), "pq", None)
    if pq is not None:
        need = max(need, 1 << pq.nbits)
    return need

