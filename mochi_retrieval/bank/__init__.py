"""The FAISS hard-negative bank, one job per file.

- :mod:`.settings`: :class:`BankSettings`, the ``bank`` config section;
- :mod:`.rows`: the rows, their id map, groups and staleness stamps;
- :mod:`.index`: the exact index over the rows (torch, FAISS CPU, FAISS GPU);
- :mod:`.select`: candidate selection, a pure function of scores, exclusions, ceiling and rank window;
- :mod:`.refresh`: when rows are re-embedded (initial pass, full refresh, rolling slices);
- :mod:`.corpus`: the documents a text bank indexes;
- :mod:`.store`: :class:`FaissNegativeBank`, the bank itself;
- :mod:`.source`: :class:`BankSource`, the bank as a negative source (one search per step, key writes).
"""
from .corpus import BankCorpus
from .refresh import RefreshPolicy
from .select import select_candidates
from .settings import BankSettings
from .source import BankSource
from .store import FaissNegativeBank

__all__ = ["BankCorpus", "BankSettings", "BankSource", "FaissNegativeBank", "RefreshPolicy", "select_candidates"]
