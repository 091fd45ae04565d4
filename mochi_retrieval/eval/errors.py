"""The one exception type evaluation code raises for bad user input (defined in :mod:`mochi_retrieval.errors`,
below the data layer, since data loaders such as the BEIR reader raise it too)."""

from __future__ import annotations

from mochi_retrieval.errors import EvalInputError

__all__ = ["EvalInputError"]
