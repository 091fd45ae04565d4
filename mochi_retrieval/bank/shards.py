"""A sharded bank's search: the step's queries of every process, each process's top list over the rows it
holds, and their merge, so that every process sees the ranked lists one process holding the whole bank would
(FAISS's ``IndexShards`` does the same within one process). Selection (:mod:`.select`) then runs unchanged on
the merged lists, on every process for every query, so every process takes the same decisions (the re-search
rounds for queries left short included) and makes the same collective calls.

The collectives live in :mod:`mochi_retrieval.distributed`; this file only arranges the tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import distributed
from .rows import BankRows


@dataclass
class GatheredQueries:
    """Every process's queries, in rank order.

    Attributes:
        q: (B_all, D) unit queries; excl: (B_all, E) excluded rows, -1 padded; excl_groups: (B_all, G) or
        None; ceiling: (B_all,) or None; start, stop: this process's queries are rows start..stop-1.
    """

    q: Tensor
    excl: Tensor
    excl_groups: Tensor | None
    ceiling: Tensor | None
    start: int
    stop: int


def gather_queries(q: Tensor, excl: Tensor, excl_groups: Tensor | None, ceiling: Tensor | None) -> GatheredQueries:
    """Gather (b, D) queries, (b, E) exclusions, (b, G) groups and (b,) ceilings of every process (the widths E
    and G may differ between processes: padded with -1). Whether groups and a ceiling exist is a setting, the
    same on every process."""
    rows = q.shape[0]
    ceil = torch.full((rows, 1), float("inf")) if ceiling is None else ceiling.reshape(-1, 1).float()
    packed, sizes = distributed.all_gather_padded(torch.cat([q.float().cpu(), ceil.cpu()], dim=1), 0.0)
    all_excl, _ = distributed.all_gather_padded(excl, -1)
    all_groups = None if excl_groups is None else distributed.all_gather_padded(excl_groups, -1)[0]
    start = sum(sizes[: distributed.rank()])
    return GatheredQueries(packed[:, :-1].contiguous(), all_excl, all_groups,
                           None if ceiling is None else packed[:, -1].contiguous(), start, start + rows)


def merged_search(search: Callable[[Tensor, int], tuple[Tensor, Tensor]], rows: BankRows, q: Tensor,
                  kk: int) -> tuple[Tensor, Tensor]:
    """The global top-kk of (b, D) queries over every shard: scores, global rows (b, kk), best first.

    ``search(q, k)`` searches this process's rows (positions in its embeddings); every process calls this
    with the same queries and kk. Each shard's top min(kk, n_r) is padded to kk, the W lists gathered and the
    best kk of their union kept (a stable sort: equal scores keep the rank order)."""
    b, held = q.shape[0], rows.embeddings.shape[0]
    scores = torch.full((b, kk), float("-inf"))
    found = torch.full((b, kk), -1, dtype=torch.long)
    if held and b:
        s, i = search(q, min(kk, held))
        scores[:, : s.shape[1]], found[:, : i.shape[1]] = s, rows.global_rows(i)
    all_scores = distributed.all_gather_stack(scores)  # (W, b, kk)
    all_rows = distributed.all_gather_stack(found)
    flat_scores = all_scores.permute(1, 0, 2).reshape(b, -1)
    flat_rows = all_rows.permute(1, 0, 2).reshape(b, -1)
    order = torch.sort(flat_scores, dim=1, descending=True, stable=True).indices[:, :kk]
    return flat_scores.gather(1, order), flat_rows.gather(1, order)


def fetch_rows(rows: BankRows, picked: Tensor) -> tuple[Tensor, Tensor]:
    """Vectors (b, k, D) and stamps (b, k) of global rows ``picked`` (b, k) (-1 = empty: zeros and -1), on
    every process: each fills the rows it holds and the fills are summed (exact: one owner per row)."""
    mine = rows.owned(picked)
    vectors = torch.zeros((*picked.shape, rows.dim), dtype=torch.float32, device=rows.embeddings.device)
    stamps = torch.zeros(picked.shape, dtype=torch.long)
    local = rows.local(picked[mine])
    vectors[mine.to(vectors.device)] = rows.embeddings[local.to(rows.embeddings.device)]
    stamps[mine] = rows.stamps[local] + 1  # +1: an empty slot sums to 0 and reads back as -1 (never)
    return distributed.all_reduce_sum(vectors), distributed.all_reduce_sum(stamps) - 1


def mean_age(rows: BankRows, step: int) -> Tensor | None:
    """The mean of ``step - stamp`` over every embedded row of every shard (float64 sums), or None."""
    embedded = rows.stamps[rows.stamps >= 0]
    sums = torch.tensor([float((step - embedded).double().sum()) if embedded.numel() else 0.0,
                         float(embedded.numel())], dtype=torch.float64)
    total, count = distributed.all_reduce_sum(sums).tolist()
    return torch.tensor(total / count, dtype=torch.float32) if count else None


def layout() -> tuple[int, int]:
    """(world, rank) of this process."""
    return distributed.world_size(), distributed.rank()


def total_rows(held: int) -> int:
    """N: the rows held by every process, summed."""
    return int(distributed.all_reduce_sum(torch.tensor([held], dtype=torch.long))[0])
