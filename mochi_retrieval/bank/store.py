"""The FAISS hard-negative bank: rows (:mod:`.rows`), an exact index over them (:mod:`.index`) and the
candidate rule (:mod:`.select`), ANCE style.

The bank holds a corpus embedded by the key encoder, (N, D), L2-normalised. It
is replaced whole with :meth:`FaissNegativeBank.refresh` and patched in place
with :meth:`update` (a rolling refresh's slice, a batch's keys, re-encoded mined
documents); each row remembers the step it was written at (its staleness).
Per query it returns candidate negatives: the top-k documents by inner product
after removing the query's positives and every document in an excluded group
(identical text, or the same family), after skipping the first ``skip_top``
survivors (rank window) and any survivor scoring above ``max_similarity``
(ceiling against likely false negatives).

The result is exact: the bank searches ``k + slack`` neighbours, filters them,
and searches again with twice as many for the queries left short, up to N.
Two backends give the same candidates (ties aside): ``"faiss"`` (a flat
inner-product index, on the GPU when asked for and available) and ``"torch"``
(exact ``q @ E.T`` via :func:`mochi_retrieval.search.search`, the test oracle).

Example::

    bank = FaissNegativeBank(device="auto")
    bank.refresh(doc_emb, text_group=groups)           # (N, D), (N,)
    idx, vecs = bank.candidates(q, 16, exclude=pos)    # (B, 16), (B, 16, D)
    out = contrastive_loss(q, k, (queue.negatives(), vecs), T, mochi=cfg)
"""
from __future__ import annotations

import logging
import time
from typing import Literal, Sequence

import torch
from torch import Tensor

from .. import distributed
from ..search import faiss_num_gpus, l2_normalize
from . import shards
from .drift import DriftCorrection
from .index import BankIndex
from .rows import NEVER, BankRows
from .select import select_candidates

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
Exclude = Tensor | Sequence[set[int] | Sequence[int]] | None


class FaissNegativeBank:
    """Candidate negatives per query from a refreshed corpus index.

    Args:
        backend: "faiss" (flat inner-product index) or "torch" (exact matmul).
        device: "cpu"; "cuda" (GPU, or CPU with a warning when none is usable);
            "auto" (GPU when usable, else CPU).
        slack: extra neighbours fetched in the first search on top of
            ``k + skip_top + positives``.
        index: a FAISS ``index_factory`` string ("Flat" = exact; "IVF1024,Flat", "HNSW32", "IVF1024,PQ32",
            "SQfp16", ...), built and trained at each refresh.
        search_params: a ``faiss.ParameterSpace`` string for it ("nprobe=64", "efSearch=128"); None = defaults.
        shard: under W processes, each holds only its 1/W of the rows (rows ``rank::W``) and a search merges
            the shards' top lists: every process gets what one process holding the whole bank would. Every
            call that searches, refreshes or reads the bank's state is then a collective: all processes call it.
        recall_queries: at each refresh, the share of the exact top ``recall_k`` that the index returns is
            measured on this many of the bank's own rows (fixed seed): :attr:`last_recall`; 0 = off.
        drift_correction: rank and serve each row as ``normalise(e + m(now) - m(stamp))``, m(now) - m(stamp)
            being the space's mean move since the row was embedded, measured on the rows a rolling refresh
            re-embeds (:mod:`.drift`). Needs the exact index and an unsharded bank: every row's estimate
            moves with m(now).
        rerank: F > 1 with a code index: the index shortlists F times the rows a search needs and the rows'
            exact scores order them (:func:`.index.rerank_exact`).
        rows_dir: keep the rows in a memory-mapped file in this folder instead of memory (:class:`.rows.BankRows`):
            with a code index and ``rerank``, the process holds the codes and reads only shortlisted rows.
    """

    def __init__(self, backend: Literal["faiss", "torch"] = "faiss", device: Device = "cpu", slack: int = 32, *,
                 index: str = "Flat", search_params: str | None = None, shard: bool = False,
                 recall_queries: int = 64, recall_k: int = 16, drift_correction: bool = False,
                 rerank: int = 1, rows_dir: str | None = None) -> None:
        if backend not in ("faiss", "torch"):
            raise ValueError(f"unknown bank backend {backend!r}; use 'faiss' or 'torch'")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown bank device {device!r}; use 'auto', 'cpu' or 'cuda'")
        if drift_correction and (shard or index != "Flat"):
            raise ValueError(f"bank.drift_correction needs bank.index='Flat' and bank.shard=false (got "
                             f"index={index!r}, shard={shard}): every row's estimate moves with each measurement")
        self.backend, self.slack, self.shard = backend, max(0, int(slack)), shard
        self.use_gpu = self._resolve_gpu(backend, device)
        self.rows = BankRows("cuda" if self.use_gpu and backend == "torch" else "cpu", rows_dir=rows_dir)
        self.index = BankIndex(backend, self.use_gpu, index, search_params, rerank=rerank)
        self.recall_queries, self.recall_k = recall_queries, recall_k
        self.last_refresh_seconds = 0.0
        self.last_search_rounds = 0
        self.last_recall: float | None = None  # the index's recall@recall_k at the last refresh
        self.last_rows: Tensor | None = None
        self.last_stamps: Tensor | None = None
        self.drift = DriftCorrection() if drift_correction else None
        self._search_rows: Tensor | None = None  # (N, D) drift-corrected estimates of the rows (drift correction)
        self.last_drift_shift: Tensor | None = None  # (B, k) how much the correction moved each served row's score

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

    # ------------------------------------------------------------------ rows
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return self.rows.dim

    @property
    def sharded(self) -> bool:
        """Whether this process holds only its share of the rows (``shard`` under several processes)."""
        return self.rows.world > 1

    def layout(self) -> tuple[int, int]:
        """(world, rank) of the rows' split: (W, this process) with ``shard``, else (1, 0)."""
        return shards.layout() if self.shard else (1, 0)

    @property
    def embeddings(self) -> Tensor:
        """(n, D) unit rows this process holds (all N unsharded; the source of truth)."""
        return self.rows.embeddings

    @property
    def ids(self) -> Tensor | None:
        return self.rows.ids

    @property
    def text_group(self) -> Tensor | None:
        """(N,) group of every row (equal = false negatives of each other), or None."""
        return self.rows.groups

    @property
    def stamps(self) -> Tensor:
        """(n,) step at which each held row was last written (-1 = never by the model)."""
        return self.rows.stamps

    @torch.no_grad()
    def refresh(self, embeddings: Tensor, ids: Tensor | None = None, text_group: Tensor | None = None, *,
                step: int = NEVER, normalized: bool = False) -> None:
        """Replace the whole corpus and rebuild the index.

        Sharded, every process calls it with the rows it holds, ``embeddings[r]`` = row ``rank + r * W``.

        Args:
            embeddings: (N, D) document embeddings (sharded: (ceil((N - rank) / W), D)); normalised and
                detached here.
            ids: (N,) distinct non-negative int ids used in ``exclude``,
                :meth:`update` and the returned indices; None = row numbers.
            text_group: (N,) ints, equal for identical texts (negative = in
                no group); None keeps the current groups if they still have
                N rows, else drops them.
            step: the step the embeddings were computed at (staleness); -1 = not by the model.
            normalized: the rows are unit float32 already: kept as given (no copy; a 10M-row bank cannot
                afford a second one).
        """
        start = time.perf_counter()
        world, rank = self.layout()
        layout = None
        if world > 1:
            total = shards.total_rows(embeddings.shape[0])
            if ids is not None and ids.numel() != total:
                raise ValueError(f"sharded bank: the processes hold {total} rows between them but ids has "
                                 f"{ids.numel()}")
            layout = (world, rank, total)
        self.rows.replace(embeddings, ids, text_group, step, normalized=normalized, layout=layout)
        if self.drift is not None:
            self.drift.reset(self.dim, step)
            self._search_rows = None
        self.index.reset()
        self._measure_recall()
        self.last_refresh_seconds = time.perf_counter() - start
        logger.info("bank refreshed: %d x %d (%d held here), %s index %r on %s, %.3f s", len(self), self.dim,
                    self.embeddings.shape[0], self.backend, self.index.spec, "GPU" if self.use_gpu else "CPU",
                    self.last_refresh_seconds)

    def _measure_recall(self) -> None:
        """:attr:`last_recall`: the share of the exact top ``recall_k`` (torch over the held rows) that the
        index returns, rows tied with the exact k-th score counted in, for ``recall_queries`` of the held rows
        drawn with a fixed seed; averaged over shards."""
        if not self.recall_queries:
            return
        held = self.embeddings.shape[0]
        k = min(self.recall_k, held)
        share = torch.zeros(2, dtype=torch.float64)  # (hits / k summed over queries, queries)
        if k:
            pick = torch.randperm(held, generator=torch.Generator().manual_seed(0))[: self.recall_queries]
            q = self.embeddings[pick.to(self.embeddings.device)]
            if self.index.exact:
                hits = torch.ones(pick.numel())
            else:
                exact, _ = BankIndex("torch", False).search(self.embeddings, q, k)
                _, found = self.index.search(self.embeddings, q, k)
                hits = tie_aware_hits(q, self.embeddings, found, exact[:, -1]) / k
            share = torch.stack([hits.double().sum(), torch.tensor(float(pick.numel()), dtype=torch.float64)])
        if self.sharded:
            share = distributed.all_reduce_sum(share)
        self.last_recall = float(share[0] / share[1]) if share[1] else None
        if self.last_recall is not None and not self.index.exact:
            logger.info("bank index %r: recall@%d %.4f of exact search on %d rows", self.index.spec, k,
                        self.last_recall, int(share[1]))

    @torch.no_grad()
    def update(self, doc_indices: Tensor, embeddings: Tensor, step: int = NEVER, *,
               measure_drift: bool = False) -> None:
        """Replace rows in place: doc_indices (n,) ids, embeddings (n, D), written at ``step``; sharded, the rows
        this process holds among them. The index follows lazily. ``measure_drift``: the embeddings are fresh
        eval-mode embeddings of these rows (a rolling slice), so under drift correction they measure the
        space's move m(step)."""
        self._check_ready()
        doc_indices = doc_indices.reshape(-1)
        if embeddings.shape != (doc_indices.numel(), self.dim):
            raise ValueError(f"embeddings must be ({doc_indices.numel()}, {self.dim}), got {tuple(embeddings.shape)}")
        rows = self.rows.rows_of(doc_indices)
        if (rows < 0).any():
            raise ValueError(f"update names ids not in the bank: {doc_indices.cpu()[rows < 0][:5].tolist()}")
        if self.drift is None:
            self.index.changed(self.rows.write(rows, embeddings, step))
            return
        if measure_drift:
            self.drift.observe(self.embeddings[rows.to(self.embeddings.device)], self.stamps[rows],
                               l2_normalize(embeddings.detach().float()), step)
        else:
            self.drift.record(step)
        self.rows.write(rows, embeddings, step)
        self.drift.prune(self.stamps)
        self._search_rows = None  # every row's estimate moved with m(now)
        self.index.reset()

    def _searched(self) -> Tensor:
        """(N, D) the unit rows the index ranks and serves: the embeddings, or under drift correction their
        estimates normalise(e + m(now) - m(stamp)), rebuilt after every write (a rolling refresh writes and
        measures every step)."""
        if self.drift is None:
            return self.embeddings
        if self._search_rows is None:
            move = (self.drift.current - self.drift.offsets(self.stamps)).to(self.embeddings.device)
            self._search_rows = l2_normalize(self.embeddings + move)
        return self._search_rows

    def add(self, keys: Tensor, ids: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Write keys (n, D) to the rows of ``ids`` (n,); see :meth:`update`."""
        if ids is None:
            raise ValueError("a FaissNegativeBank needs the ids of the keys it is given (add(keys, ids))")
        self.update(ids, keys)

    def contains(self, ids: Tensor) -> Tensor:
        """Bool tensor shaped like ``ids``: which ids the bank holds (on the CPU)."""
        return self.rows.rows_of(ids) >= 0

    def _check_ready(self) -> None:
        if len(self) == 0:
            raise RuntimeError("the bank is empty: call refresh(embeddings) first")

    def _exclusion_rows(self, exclude: Exclude, b: int) -> Tensor:
        """``exclude`` -> (b, E) CPU row numbers, -1 padding."""
        if exclude is None:
            return torch.full((b, 0), -1, dtype=torch.long)
        if isinstance(exclude, Tensor):
            if exclude.dim() != 2 or exclude.shape[0] != b:
                raise ValueError(f"exclude tensor must be (B={b}, E), got shape {tuple(exclude.shape)}")
            return self.rows.rows_of(exclude)
        if len(exclude) != b:
            raise ValueError(f"exclude must hold one set per query: {len(exclude)} for B={b} queries")
        width = max((len(e) for e in exclude), default=0)
        pad = torch.full((b, width), -1, dtype=torch.long)
        for r, e in enumerate(exclude):
            if len(e):
                pad[r, : len(e)] = torch.tensor(sorted(e), dtype=torch.long)
        return self.rows.rows_of(pad)

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def candidates(
        self,
        queries: Tensor,
        k: int,
        *,
        exclude: Exclude = None,
        exclude_text_dupes: bool = True,
        exclude_groups: Tensor | None = None,
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
                equals that of an excluded document the bank holds (needs text groups).
            exclude_groups: (B, G) groups to drop per query (-1 padded), in the bank's group space: the
                groups of the query's positives, known even for positives the bank does not hold.
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
        groups, excl_groups = self._exclusion_groups(excl, exclude_groups, exclude_text_dupes, b)
        ceiling = None if max_similarity is None else \
            torch.as_tensor(max_similarity, dtype=torch.float32).detach().cpu().reshape(-1).expand(b)
        mine = slice(0, b)
        if self.sharded:  # every process's queries, searched over every shard
            g = shards.gather_queries(q, excl, excl_groups, ceiling)
            q, excl, excl_groups, ceiling, mine = g.q, g.excl, g.excl_groups, g.ceiling, slice(g.start, g.stop)
        out = self._select(q, k, excl, groups, excl_groups, skip_top, ceiling, allow_fewer)
        if self.sharded:
            vectors, stamps = shards.fetch_rows(self.rows, out)
            out, vectors, stamps = out[mine], vectors[mine], stamps[mine]
        else:
            missing = out < 0
            picked = out.clamp(min=0).to(self.embeddings.device)
            vectors = self._searched()[picked]
            self.last_drift_shift = None
            if self.drift is not None:  # (B, k) how much the correction moved each served row's score
                lift = vectors - self.embeddings[picked]
                self.last_drift_shift = (q.unsqueeze(1).to(lift.device) * lift).sum(-1).cpu()
            if missing.any():
                vectors = vectors.masked_fill(missing.to(vectors.device).unsqueeze(-1), 0.0)
            stamps = torch.where(missing, NEVER, self.stamps[out.clamp(min=0)])
        self.last_rows, self.last_stamps = out, stamps  # (B, k) CPU rows served (-1 = empty) and their stamps
        return self.rows.ids_of(out).to(queries.device), vectors.to(queries.device, torch.float32)

    def _select(self, q: Tensor, k: int, excl: Tensor, groups: Tensor | None, excl_groups: Tensor | None,
                skip_top: int, ceiling: Tensor | None, allow_fewer: bool) -> Tensor:
        """(b, k) rows of :meth:`candidates`: search ``k + skip_top + E + slack`` neighbours, select, and
        search again with twice as many for the queries left short, up to N. Sharded, every process runs it
        on the same gathered queries, so the rounds (collectives) agree."""
        n, b = len(self), q.shape[0]
        out = torch.full((b, k), -1, dtype=torch.long)
        todo = torch.arange(b)
        kk, self.last_search_rounds = min(n, k + skip_top + excl.shape[1] + self.slack), 0
        while todo.numel():
            self.last_search_rounds += 1
            if self.sharded:
                scores, rows = shards.merged_search(lambda x, m: self.index.search(self.embeddings, x, m),
                                                    self.rows, q[todo], kk)
            else:
                scores, rows = self.index.search(self._searched(), q[todo], kk)
            left, picked = select_candidates(
                scores, rows, k, exclude_rows=excl[todo], row_groups=groups,
                exclude_groups=None if excl_groups is None else excl_groups[todo], skip_top=skip_top,
                ceiling=None if ceiling is None else ceiling[todo])
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
        return out

    def _exclusion_groups(self, excl: Tensor, given: Tensor | None, dupes: bool,
                          b: int) -> tuple[Tensor | None, Tensor | None]:
        """(N,) row groups and (b, G) groups to exclude per query: those given, and those of the excluded
        rows the bank holds (with ``dupes``); (None, None) without a group table."""
        groups = self.text_group.cpu() if self.text_group is not None else None
        if groups is None:
            return None, None
        parts = []
        if given is not None:
            given = given.detach().to("cpu", torch.long)
            if given.dim() != 2 or given.shape[0] != b:
                raise ValueError(f"exclude_groups must be (B={b}, G), got shape {tuple(given.shape)}")
            parts.append(given)
        if dupes:
            parts.append(torch.where(excl >= 0, groups[excl.clamp(min=0)], -1))
        return (groups, torch.cat(parts, dim=1)) if parts else (None, None)

    def staleness(self, step: int) -> Tensor:
        """(B, k) steps since each row served by the last :meth:`candidates` call was embedded; float, NaN for
        empty slots and for rows never embedded by the model."""
        age = (step - self.last_stamps).float()
        return age.masked_fill((self.last_rows < 0) | (self.last_stamps == NEVER), float("nan"))

    def mean_age(self, step: int) -> Tensor | None:
        """The mean of ``step - stamp`` over every row embedded by the model (every shard's), or None."""
        if self.sharded:
            return shards.mean_age(self.rows, step)
        embedded = self.stamps[self.stamps >= 0]
        return (step - embedded).float().mean() if embedded.numel() else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (``torch.load(..., weights_only=True)`` safe): embeddings, ids, text groups, stamps
        (and the drift correction's offsets); with ``shard`` also ``layout`` = (W, N). Sharded over W > 1
        processes, the embeddings and stamps are this process's rows only."""
        state = self.rows.state_dict()
        if self.drift is not None:
            state.update(self.drift.state_dict())
        if self.shard:
            state["layout"] = torch.tensor([self.rows.world, len(self)], dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a :meth:`state_dict` (rebuilds the index). Sharded, every process loads the state its
        counterpart saved, under as many processes as saved it."""
        missing = {"embeddings", "ids", "text_group"} - set(state)
        if missing:
            raise KeyError(f"bank state_dict lacks {sorted(missing)}")
        self.check_layout(state)
        self.rows.groups = None
        ids, groups = state["ids"], state["text_group"]
        self.refresh(state["embeddings"], ids if ids.numel() else None, groups if groups.numel() else None,
                     normalized=True)  # stored rows are unit already: keep them bit for bit
        if "stamps" in state and state["stamps"].shape == self.rows.stamps.shape:
            self.rows.stamps = state["stamps"].clone()
        if self.drift is not None:
            if "drift_current" in state:
                self.drift.load_state_dict(state)
            else:  # saved without the correction: every row as it is, until the next measurement
                self.drift.reset(self.dim, NEVER)
                for stamp in self.stamps.unique().tolist():
                    self.drift.record(stamp)
            self._search_rows = None

    def check_layout(self, state: dict[str, Tensor]) -> None:
        """Raise a ValueError when ``state`` was saved under another split of the rows than this run's."""
        world = self.layout()[0]
        saved = int(state["layout"][0]) if "layout" in state else 1
        if "layout" in state and not self.shard:
            raise ValueError("the checkpoint holds a sharded bank (bank.shard=true) but this run has bank.shard=false")
        if saved != world:
            raise ValueError(f"the checkpoint's bank is sharded over {saved} process(es) but this run has {world}: "
                             f"resume with {saved} processes (or train.resume=false, or bank.shard=false "
                             "to start the bank again)")


TIE = 1e-5  # exact scores this close are a tie: identical documents embed identically


def tie_aware_hits(q: Tensor, rows: Tensor, found: Tensor, kth_exact: Tensor) -> Tensor:
    """(b,) float64: how many of the index's ``found`` (b, k) rows (-1 = none) are in the exact top k of the
    (b, D) queries over ``rows`` (n, D), a row tied with the exact k-th score (``kth_exact`` (b,)) counted in:
    which of several identical documents the index returns is arbitrary, so an id comparison would count
    exact duplicates as misses."""
    got = (q.unsqueeze(1) * rows[found.clamp(min=0).to(rows.device)]).sum(-1).cpu()  # exact scores, (b, k)
    return ((got >= kth_exact.unsqueeze(1) - TIE) & (found >= 0)).sum(1).double()
