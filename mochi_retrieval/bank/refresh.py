"""When the bank's rows are re-embedded: a pure function of the optimiser step, so a resumed run repeats the
schedule of an uninterrupted one without any state of its own.

- the initial pass: every row, once, before the first step that uses the bank (or after a resume that lost
  the bank);
- the full refresh: every row, every ``full_every`` steps (0 = never);
- the rolling refresh: a slice of ceil(N / S) rows every step, cycling through the bank in row order, so no
  row is more than S steps old; its cost per step is flat in S, not in N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RefreshPolicy:
    """Args: rows N of the bank; full_every R (0 = never); max_staleness S (0 = no rolling refresh)."""

    rows: int
    full_every: int = 0
    max_staleness: int = 0

    @property
    def slice_size(self) -> int:
        """Rows of one rolling slice: ceil(N / S), at most N (0 without a rolling refresh)."""
        if not self.max_staleness or not self.rows:
            return 0
        return min(self.rows, math.ceil(self.rows / self.max_staleness))

    def full_due(self, step: int) -> bool:
        """Whether every row is re-embedded before optimiser step ``step`` (the initial pass is apart)."""
        return self.full_every > 0 and step > 0 and step % self.full_every == 0

    def rolling_rows(self, step: int) -> Tensor:
        """(m,) the rows re-embedded before optimiser step ``step`` (steps 1, 2, ...; step 0 follows the
        initial pass): rows (step - 1) * m .. step * m - 1, modulo N."""
        m = self.slice_size
        if m == 0 or step <= 0 or self.full_due(step):
            return torch.empty(0, dtype=torch.long)
        start = ((step - 1) * m) % self.rows
        return (torch.arange(m, dtype=torch.long) + start) % self.rows


def shard(rows: Tensor, world: int, rank: int) -> Tensor:
    """This process's contiguous 1/W share of ``rows`` (possibly empty): the processes embed their shares and
    gather them in rank order, which restores ``rows``' order."""
    per = math.ceil(rows.numel() / world) if rows.numel() else 0
    return rows[rank * per: (rank + 1) * per]
