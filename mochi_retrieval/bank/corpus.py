"""The documents a bank indexes: their ids in the model's document-id space and their (prefixed) texts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor


@dataclass
class BankCorpus:
    """The documents a bank indexes: ids (N,) in the doc-id space and their (prefixed) texts."""

    ids: Tensor
    texts: Sequence[str]

    def __post_init__(self) -> None:
        if len(self.texts) != self.ids.numel() or not len(self.texts):
            raise ValueError(f"bank corpus: {self.ids.numel()} ids for {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)
