"""Drift correction for a bank whose rows were embedded at different steps (a rolling refresh).

The encoder moves during training, and the whole embedding space moves with it. Measured on the Debian
whole-corpus run (``benchmarks/studies/bank_drift.py``): a row embedded 125 steps ago has cosine 0.72 with
its fresh embedding, the current queries score it 0.20 lower than they score its fresh self, and most of
that is one translation of the space (cosine 0.89 once each age group's mean is removed). Ranked by stored
scores, the recently re-embedded rows win: 96% of a query's top-16 among equal numbers of young and old rows
are young, against 48% by fresh scores.

The correction models the drift as a translation of the space per step: m(t) is the mean move of the
encoder's embeddings from the reference frame (the last full pass, m = 0) to step t. A row written at step
s is estimated now as normalise(e + m(now) - m(s)). Every rolling slice measures the move on the rows it re-embeds,
paired, so the documents' own content cancels:

    m(t) = mean_r [ fresh_r - (stored_r - m(s_r)) ]        over the slice's rows r, stamped s_r.

The bank ranks and serves the unit estimates normalise(e + m(now) - m(s)). On the same study's rows (half
re-embedded, half stale, m measured on 56 re-embedded rows), the overlap of a query's top-16 with its top-16
by fresh embeddings goes from 0.53 (stored rows; 97% of the top-16 re-embedded against 50% by fresh ones)
to 0.80 (53%); without the normalisation 0.75, with a least-squares linear map fitted on 500 pairs 0.63.
"""
from __future__ import annotations

import torch
from torch import Tensor


class DriftCorrection:
    """The per-step offsets m(s) of the rows' stamps, and the current one m(now).

    Attributes:
        current: (D,) m(now).
    """

    def __init__(self) -> None:
        self._offsets: dict[int, Tensor] = {}  # stamp -> (D,) m(stamp)
        self.current = torch.zeros(0)

    def reset(self, dim: int, stamp: int) -> None:
        """A full pass: every row written at ``stamp``, the new reference frame (m = 0)."""
        self.current = torch.zeros(dim)
        self._offsets = {int(stamp): self.current.clone()}

    def offsets(self, stamps: Tensor) -> Tensor:
        """(n,) stamps -> (n, D) m(stamp), on the CPU."""
        table_stamps = torch.tensor(sorted(self._offsets), dtype=torch.long)
        table = torch.stack([self._offsets[int(s)] for s in table_stamps])
        pos = torch.searchsorted(table_stamps, stamps.cpu()).clamp(max=len(table_stamps) - 1)
        if (table_stamps[pos] != stamps.cpu()).any():
            missing = stamps.cpu()[table_stamps[pos] != stamps.cpu()].unique()[:5].tolist()
            raise KeyError(f"drift correction: no offset for rows stamped {missing}")
        return table[pos]

    @torch.no_grad()
    def observe(self, stored: Tensor, stamps: Tensor, fresh: Tensor, step: int) -> Tensor:
        """Measure m(step) on re-embedded rows: stored (m, D) unit rows as they were, written at stamps (m,),
        and their fresh (m, D) unit embeddings. Returns m(step), which becomes m(now)."""
        if not len(stored):
            return self.current
        move = fresh.float().cpu() - (stored.float().cpu() - self.offsets(stamps))
        self.current = move.mean(0)
        self._offsets[int(step)] = self.current.clone()
        return self.current

    def record(self, step: int) -> None:
        """Rows are written at ``step`` with the current estimate (a write-back without a measurement)."""
        self._offsets.setdefault(int(step), self.current.clone())

    def prune(self, stamps: Tensor) -> None:
        """Forget offsets of stamps no row carries any more (keeps the table at most one entry per step)."""
        live = set(stamps.unique().tolist())
        self._offsets = {s: m for s, m in self._offsets.items() if s in live}

    def state_dict(self) -> dict[str, Tensor]:
        stamps = sorted(self._offsets)
        dim = self.current.numel()
        return {"drift_stamps": torch.tensor(stamps, dtype=torch.long),
                "drift_offsets": torch.stack([self._offsets[s] for s in stamps]) if stamps else torch.zeros(0, dim),
                "drift_current": self.current.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.current = state["drift_current"].float().clone()
        self._offsets = {int(s): m.float().clone() for s, m in zip(state["drift_stamps"], state["drift_offsets"])}
