"""Adapters that bring the library's negatives into other training tools.

Each integration is its own module, imported only when asked for, since it needs the other tool
installed::

    from mochi_retrieval.integrations.sentence_transformers import BankNegativesLoss, BankRefreshCallback
"""
