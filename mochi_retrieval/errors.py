"""The exception type for bad user input to data loading and evaluation (a leaf module: no imports)."""

from __future__ import annotations


class EvalInputError(ValueError):
    """Bad input to an evaluation: a data folder in the wrong layout, qrels that
    name unknown ids, an empty split, a model path that loads nothing, a k larger
    than the corpus. The command line prints its message and exits non-zero,
    without a traceback."""
