"""The bank as a :class:`~mochi_retrieval.negatives.NegativeSource`: the step's one search, its stored-vector
block, and the writes of the step's keys (and of re-encoded mined documents) into the bank's rows.

One search per step serves two consumers: the text adapter's mined documents (the first n candidates per
query, which it re-encodes with gradient: :meth:`BankSource.mine`) and the block of stored vectors (the next
c: :meth:`BankSource.source`). Both calls with the same :class:`~mochi_retrieval.negatives.Query` object reuse
that search.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from .. import distributed
from ..negatives import NO_ID, Query, Source
from .rows import NEVER
from .settings import BankSettings
from .store import FaissNegativeBank

Lookup = Callable[[Tensor], Tensor]


class BankSource:
    """A :class:`FaissNegativeBank` with its per-step search rules.

    Args:
        bank: the bank (refreshed by its owner).
        settings: candidates c, mined_negatives n, skip_top, max_similarity, update_with_keys.
        exclusion: "positives" (text): a query excludes ``query.exclude`` and, when it mines, the global
            batch's documents (negatives already); "own" (images): a query excludes its own item
            ``query.ids`` only.
        groups: doc ids (any shape, -1 allowed) -> their groups, for the block's entries; None = the bank's
            own group table.
        exclusion_groups: doc ids (B, E) -> the groups each query excludes (text: identical input, or the
            family); None = none beyond ``exclude_text_dupes``.
        exclude_text_dupes: also drop rows in the group of an excluded row the bank holds.
        pos_ratio: a per-query ceiling of ``pos_ratio`` x q.k (needs ``query.k``); None = none.
        allow_fewer: a query left short gets -1 padded slots instead of an error.
    """

    def __init__(self, bank: FaissNegativeBank, settings: BankSettings, *,
                 exclusion: Literal["positives", "own"] = "positives", groups: Lookup | None = None,
                 exclusion_groups: Lookup | None = None, exclude_text_dupes: bool = True,
                 pos_ratio: float | None = None, allow_fewer: bool = False) -> None:
        if exclusion not in ("positives", "own"):
            raise ValueError(f"exclusion must be 'positives' or 'own', got {exclusion!r}")
        self.bank, self.settings, self.exclusion = bank, settings, exclusion
        self.groups, self.exclusion_groups = groups, exclusion_groups
        self.exclude_text_dupes, self.pos_ratio, self.allow_fewer = exclude_text_dupes, pos_ratio, allow_fewer
        self.stamp = NEVER  # the step written into the staleness stamps of the rows this source writes
        self._last: tuple[Query, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ search
    def _search(self, query: Query) -> tuple[Tensor, Tensor]:
        """(B, n + c) ids and (B, n + c, D) stored vectors of ``query``'s one search (cached per Query)."""
        if self._last is not None and self._last[0] is query:
            return self._last[1], self._last[2]
        s, q = self.settings, query.q
        if query.ids is None and (self.exclusion == "own" or s.mined_negatives):
            raise ValueError("a bank needs the instance ids of the batch (ids=...)")
        if self.exclusion == "own":
            excl = query.ids.view(-1, 1)
        elif s.mined_negatives:  # the batch's documents are negatives already: not mined again
            batch_ids = distributed.all_gather_cat(query.ids)
            excl = torch.cat([query.exclude, batch_ids.view(1, -1).expand(q.shape[0], -1)], dim=1)
        else:
            excl = query.exclude
        ceiling = s.max_similarity
        if self.pos_ratio is not None:
            if query.k is None:
                raise ValueError("a bank with a positive-aware ceiling needs the positives (Query.k)")
            relative = self.pos_ratio * (q * query.k).sum(1)
            ceiling = relative if ceiling is None else relative.clamp(max=ceiling)
        found, vectors = self.bank.candidates(
            q, s.mined_negatives + s.candidates, exclude=excl, exclude_text_dupes=self.exclude_text_dupes,
            exclude_groups=None if self.exclusion_groups is None else self.exclusion_groups(excl),
            skip_top=s.skip_top, max_similarity=ceiling, allow_fewer=self.allow_fewer)
        self._last = (query, found, vectors)
        return found, vectors

    def mine(self, query: Query) -> Tensor | None:
        """(B, n) doc ids to re-encode with gradient, or None without mined negatives. A slot left empty
        (a query short of candidates under its ceiling) holds the query's own positive: masked for it (a false
        negative) and, as a duplicate of an in-batch document, for every other query; the batch keeps a fixed
        shape."""
        n = self.settings.mined_negatives
        if not n:
            return None
        found, _ = self._search(query)
        return torch.where(found[:, :n] >= 0, found[:, :n], query.ids.view(-1, 1).to(found.device))

    def source(self, query: Query, name: str = "bank") -> Source:
        """The block of stored vectors: (B, c, D) detached, their ids and groups (B, c); the search excluded
        the query's positives, so the mask marks only the empty slots (-1)."""
        found, vectors = self._search(query)
        n, device = self.settings.mined_negatives, query.q.device
        ids, vectors = found[:, n:].to(device), vectors[:, n:].to(device)
        return Source(name, vectors, ids, self._groups(ids), False, ids < 0)

    def _groups(self, ids: Tensor) -> Tensor:
        if self.groups is not None:
            return self.groups(ids)
        table = self.bank.text_group
        if table is None:
            return torch.full_like(ids, NO_ID)
        table = table.to(ids.device)
        return torch.where(ids >= 0, table[ids.clamp(min=0)], NO_ID)

    # ------------------------------------------------------------------ writes
    @torch.no_grad()
    def add(self, keys: Tensor, ids: Tensor | None = None, labels: Tensor | None = None) -> None:
        """With ``update_with_keys``: every process's keys (n, D) replace the bank rows of their ids (n,) (ids
        the bank does not hold are skipped)."""
        if not self.settings.update_with_keys or not len(self.bank):
            return
        self.write(distributed.all_gather_cat(ids), distributed.all_gather_cat(keys))

    @torch.no_grad()
    def write(self, ids: Tensor, vectors: Tensor) -> None:
        """Rows of ``ids`` (n,) (the same on every process) <- ``vectors`` (n, D), stamped with ``stamp``;
        ids the bank does not hold are skipped. A sharded bank writes the rows this process owns."""
        known = self.bank.contains(ids)
        if known.any():
            self.bank.update(ids.cpu()[known], vectors.detach().cpu()[known], step=self.stamp)
