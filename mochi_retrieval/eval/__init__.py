"""Evaluation: retrieval (recall@k, MRR, nDCG), kNN, linear probe, detection transfer.

Evaluators only need an encode function. The command line is
``python -m mochi_retrieval.eval`` (see :mod:`mochi_retrieval.eval.cli`).
"""

from mochi_retrieval.data.beir import BeirData, load_beir
from mochi_retrieval.eval.errors import EvalInputError
from mochi_retrieval.eval.retrieval import RetrievalEvaluator, RetrievalResult

__all__ = ["BeirData", "EvalInputError", "RetrievalEvaluator", "RetrievalResult", "load_beir"]
