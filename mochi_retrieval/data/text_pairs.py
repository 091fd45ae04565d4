"""Text pairs for contrastive training: (query, positive[, negatives]) loaded from BEIR or pair files.

Sources::

    pairs = TextPairs.from_beir("data/debian", split="train")   # one pair per (query, doc with grade > 0)
    pairs = TextPairs.from_file("pairs.jsonl")                  # .jsonl/.json, .csv, .tsv, .parquet
    pairs = TextPairs.from_dataset(ds)                          # any datasets.Dataset

A pair file has the columns ``query`` and ``positive`` and, optionally, hard
negatives as one ``negative`` column (a text or a list of texts) or as
``negative_1 .. negative_n`` (names configurable). Every example must carry the
same number of negatives, so a batch holds exactly B*n negative rows.

Batches follow the training-data protocol of :mod:`mochi_retrieval.data.images`:
a seeded per-(seed, epoch) permutation split into global batches, process r of
W taking the r-th slice, so a resumed run repeats the same batches. Texts are
tokenized when the batch is built, with the optional asymmetric prefixes
(``"query: "``, ``"passage: "``) added first::

    batches = TextPairBatches(pairs, encoder.tokenize, Sharding(64), seed=0, query_prefix="query: ")
    for batch in batches.epoch(0):
        batch["query"]["input_ids"]   # (B, L), L <= encoder.max_length
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from .beir import load_beir
from .images import Sharding, epoch_permutation

logger = logging.getLogger(__name__)

Tokenize = Callable[[list[str]], dict[str, Tensor]]
"""texts (B,) -> dict of (B, L) tensors, e.g. :meth:`HFTextEncoder.tokenize` (which truncates to max_length)."""

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
                ".parquet": "parquet", ".pq": "parquet"}  # extension -> datasets builder
_SHOW = 5  # how many offending rows an error message lists


@dataclass(frozen=True)
class TextPair:
    """One training example. ``doc_id`` indexes :attr:`TextPairs.doc_texts` (BEIR), else None."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    doc_id: int | None = None


def _is_empty(text: Any) -> bool:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return True
    return not str(text).strip()


def _rows(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:_SHOW])
    return shown + (f", ... ({len(rows) - _SHOW} more)" if len(rows) > _SHOW else "")


@dataclass
class TextPairs:
    """Validated training pairs.

    Attributes:
        examples: the pairs, in source order.
        source: where they came from, for messages.
        doc_ids, doc_texts: the BEIR corpus (for a negative bank), or None for pair files.
        query_positives: whitespace-normalised query text -> every doc index judged relevant to it (the
            qrels), kept by :meth:`subset` so that a positive whose pair was not drawn stays masked; None =
            from the examples.
    """

    examples: list[TextPair]
    source: str = "text pairs"
    doc_ids: list[str] | None = None
    doc_texts: list[str] | None = None
    query_positives: dict[str, frozenset[int]] | None = None
    num_negatives: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError(f"{self.source}: the data set is empty (no pairs)")
        self._check_empty()
        counts = {len(ex.negatives) for ex in self.examples}
        if len(counts) > 1:
            n0 = len(self.examples[0].negatives)
            bad = [i for i, ex in enumerate(self.examples) if len(ex.negatives) != n0]
            raise ValueError(f"{self.source}: examples carry different numbers of negatives ({sorted(counts)}); "
                             f"row 0 has {n0}, rows differing: {_rows(bad)} (rows count from 0)")
        self.num_negatives = counts.pop()
        with_doc = sum(ex.doc_id is not None for ex in self.examples)
        if 0 < with_doc < len(self.examples):
            raise ValueError(f"{self.source}: {with_doc} of {len(self.examples)} examples have a doc_id; "
                             "give every example one or none")
        logger.info("%s: %d pairs, %d negatives each", self.source, len(self.examples), self.num_negatives)

    def _check_empty(self) -> None:
        where: dict[str, list[int]] = {"query": [], "positive": [], "negative": []}
        for i, ex in enumerate(self.examples):
            if _is_empty(ex.query):
                where["query"].append(i)
            if _is_empty(ex.positive):
                where["positive"].append(i)
            if any(_is_empty(t) for t in ex.negatives):
                where["negative"].append(i)
        total = sum(len(v) for v in where.values())
        if total:
            parts = [f"{name} in {len(rows)} row{'s' * (len(rows) > 1)}: {_rows(rows)}"
                     for name, rows in where.items() if rows]
            raise ValueError(f"{self.source}: {total} empty texts ({'; '.join(parts)}; rows count from 0)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TextPair:
        return self.examples[index]

    def ids(self) -> Tensor:
        """(N,) long: each example's positive doc index (BEIR), else its example index."""
        if self.examples[0].doc_id is not None:
            return torch.tensor([ex.doc_id for ex in self.examples], dtype=torch.long)
        return torch.arange(len(self.examples), dtype=torch.long)

    def positive_doc_sets(self) -> list[frozenset[int]]:
        """Per example, every doc index judged relevant to its query text (whitespace-normalised): from the
        qrels (:attr:`query_positives`) when known, else from the examples.

        A query with several relevant documents must not get the others as
        negatives; empty sets when the examples carry no doc ids.
        """
        by_query = self.query_positives if self.query_positives is not None else self._positives_of_examples()
        return [frozenset(by_query.get(" ".join(ex.query.split()), ())) for ex in self.examples]

    def _positives_of_examples(self) -> dict[str, frozenset[int]]:
        by_query: dict[str, set[int]] = {}
        for ex in self.examples:
            if ex.doc_id is not None:
                by_query.setdefault(" ".join(ex.query.split()), set()).add(ex.doc_id)
        return {q: frozenset(d) for q, d in by_query.items()}

    def subset(self, indices: Sequence[int], source: str) -> TextPairs:
        """The examples at ``indices``, keeping the corpus and every query's judged positives (so a relevant
        document whose pair was not drawn is still no negative of its query)."""
        positives = self.query_positives if self.query_positives is not None else (
            self._positives_of_examples() if self.examples[0].doc_id is not None else None)
        return TextPairs([self.examples[i] for i in indices], source, self.doc_ids, self.doc_texts, positives)

    def positive_id_sets(self) -> list[frozenset[int]]:
        """Per example, every id of :meth:`ids` that is a positive of its query text.

        BEIR: :meth:`positive_doc_sets`. Pair files: the indices of every example
        with the same (whitespace-normalised) query text.
        """
        if self.examples[0].doc_id is not None:
            return self.positive_doc_sets()
        by_query: dict[str, set[int]] = {}
        for i, ex in enumerate(self.examples):
            by_query.setdefault(" ".join(ex.query.split()), set()).add(i)
        return [frozenset(by_query[" ".join(ex.query.split())]) for ex in self.examples]

    def doc_space(self) -> list[str]:
        """The texts the ids of :meth:`ids` index: the BEIR corpus, else each example's positive."""
        if self.doc_texts is not None and self.examples[0].doc_id is not None:
            return list(self.doc_texts)
        return [ex.positive for ex in self.examples]

    def training_doc_ids(self) -> Tensor:
        """(N,) sorted distinct ids of the documents that are positives of some example."""
        return self.ids().unique()

    @classmethod
    def from_beir(cls, root: str | Path, split: str = "train") -> TextPairs:
        """One pair per (query, relevant document with grade > 0) of a BEIR folder's ``split``.

        ``doc_id`` is the document's index in ``doc_texts`` (the whole corpus), so
        a negative bank can exclude each query's positives.
        """
        data = load_beir(root, split)
        index = {d: i for i, d in enumerate(data.doc_ids)}
        examples = [
            TextPair(qtext, data.doc_texts[index[d]], (), index[d])
            for qid, qtext in zip(data.query_ids, data.query_texts)
            for d, grade in data.qrels[qid].items() if grade > 0
        ]
        return cls(examples, f"{root} (split {split!r})", data.doc_ids, data.doc_texts)

    @classmethod
    def from_file(cls, path: str | Path, query_column: str = "query", positive_column: str = "positive",
                  negative_column: str = "negative", cache_dir: str | None = None) -> TextPairs:
        """Load a JSONL/JSON, CSV/TSV or Parquet pair file through ``datasets.load_dataset``."""
        path = Path(path)
        kind = FILE_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"{path}: unknown pairs file extension {path.suffix!r}; "
                             f"expected one of {', '.join(FILE_FORMATS)}")
        if not path.is_file():
            raise ValueError(f"pairs file {path} does not exist")
        if path.stat().st_size < 4096 and not path.read_bytes().strip():  # blank file
            raise ValueError(f"{path}: the data set is empty (no pairs): the file is empty")
        kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        check_lines(path)
        import datasets

        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
        except Exception as err:  # datasets raises many types for a malformed file
            if "corresponds to no data" in str(err):  # a header but no rows
                raise ValueError(f"{path}: the data set is empty (no pairs): no rows") from err
            raise ValueError(f"{path}: could not read it as {kind}: {err}") from err
        return cls.from_dataset(ds, query_column, positive_column, negative_column, source=str(path))

    @classmethod
    def from_dataset(cls, ds: Any, query_column: str = "query", positive_column: str = "positive",
                     negative_column: str = "negative", source: str = "dataset") -> TextPairs:
        """Pairs from a ``datasets.Dataset`` (or anything with ``column_names`` and ``ds[column]``)."""
        if isinstance(ds.column_names, dict):  # a DatasetDict: {split: columns}
            raise ValueError(f"{source}: got a DatasetDict with splits {', '.join(ds.column_names)}; "
                             "pass one split, e.g. ds['train']")
        columns = list(ds.column_names)
        missing = [c for c in (query_column, positive_column) if c not in columns]
        if missing:
            raise ValueError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                             f"columns found: {', '.join(repr(c) for c in columns) or '(none)'}")
        if len(ds) == 0:
            raise ValueError(f"{source}: the data set is empty (no pairs)")
        negs = _negative_lists(ds, columns, negative_column, source)
        queries, positives = ds[query_column], ds[positive_column]
        examples = [TextPair(_text(q), _text(p), n) for q, p, n in zip(queries, positives, negs)]
        return cls(examples, source)


def check_lines(path: Path) -> None:
    """Raise a ValueError naming the first empty or malformed line of a JSON-lines or CSV/TSV pairs file.

    ``datasets`` skips blank lines (shifting every later row number) and reports a
    malformed one by byte offset or not at all. Blank lines at the end are fine.
    Lines count from 1, as editors count them.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        _check_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        _check_csv(path, "\t" if suffix == ".tsv" else ",")


def _clip(line: str, width: int = 80) -> str:
    return line if len(line) <= width else line[:width] + "..."


def _check_jsonl(path: Path) -> None:
    blank = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                blank = blank or number
                continue
            if blank is not None:
                raise ValueError(f"{path}, line {blank}: empty line (a JSON-lines file holds one object a line)")
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno}): "
                                 f"{_clip(line.strip())!r}") from err
            if not isinstance(value, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(value).__name__}")


def _check_csv(path: Path, delimiter: str) -> None:
    blank = None
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        width = None
        for row in reader:
            if not any(cell.strip() for cell in row):
                blank = blank or reader.line_num
                continue
            if blank is not None:
                raise ValueError(f"{path}, line {blank}: empty line")
            if width is None:
                width = len(row)  # the header
            elif len(row) != width:
                raise ValueError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {width}: "
                                 f"{_clip(delimiter.join(row))!r}")


def _text(value: Any) -> str:
    return "" if _is_empty(value) else str(value)


def _negative_lists(ds: Any, columns: list[str], name: str, source: str) -> list[tuple[str, ...]]:
    """Per row, its negatives from ``name`` (text or list of texts) or ``name_1 .. name_n``."""
    numbered = sorted((int(m.group(1)), c) for c in columns if (m := re.fullmatch(re.escape(name) + r"_(\d+)", c)))
    if name in columns and numbered:
        raise ValueError(f"{source}: give negatives as {name!r} or as {name}_1..n, not both "
                         f"(found {name!r} and {', '.join(c for _, c in numbered)})")
    if name in columns:
        return [tuple(_text(t) for t in v) if isinstance(v, (list, tuple)) else (_text(v),) for v in ds[name]]
    if numbered:
        cols = [ds[c] for _, c in numbered]
        return [tuple(_text(t) for t in row) for row in zip(*cols)]
    return [()] * len(ds)


def duplicate_groups(texts: Sequence[str]) -> Tensor:
    """(N,) long group ids, equal exactly for texts identical after whitespace normalisation.

    Ids number the distinct texts in order of first appearance (0, 1, ...), so
    ``groups[i] == groups[j]`` marks a duplicate-text false negative.
    """
    seen: dict[str, int] = {}
    ids = [seen.setdefault(" ".join(t.split()), len(seen)) for t in texts]
    return torch.tensor(ids, dtype=torch.long)


def token_groups(texts: Sequence[str], tokenize: Tokenize, batch_size: int = 1024) -> tuple[Tensor, dict]:
    """Group texts by what the encoder sees: the token ids after truncation.

    Two documents that differ only after the encoder's maximum length are the
    same input, so one is a false negative for the other's query.

    Returns:
        groups: (N,) long, equal exactly for equal tokenised inputs, numbered in
            order of first appearance.
        table: token-id tuple -> group, to look up other texts (given negatives).
    """
    table: dict[tuple[int, ...], int] = {}
    out: list[int] = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(list(texts[i : i + batch_size]))
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
        for row, m in zip(ids, mask):
            out.append(table.setdefault(tuple(row[m].tolist()), len(table)))
    return torch.tensor(out, dtype=torch.long), table


def family_groups(texts: Sequence[str]) -> Tensor:
    """(N,) long groups of texts sharing their first paragraph (package families: libfoo1, libfoo-dev)."""
    return duplicate_groups([t.split("\n\n", 1)[0] for t in texts])


class TextPairBatches:
    """Tokenized batches of text pairs, deterministic per (seed, epoch), sharded across processes.

    Args:
        pairs: the examples.
        tokenize: texts -> dict of (B, L) tensors; it owns truncation to the maximum length.
        sharding: global batch and process slice.
        seed: base seed of the per-epoch permutation.
        query_prefix, document_prefix: prepended to queries, and to positives and negatives.
        device: where batch tensors go.

    Each batch (B = ``sharding.local_batch``, n = ``pairs.num_negatives``):
        ``query``, ``positive``: tokenized dicts of (B, L) tensors;
        ``ids``: (B,) long, positive doc index (BEIR) or example index;
        ``exclude``: (B, E) long, every id that is a positive of the example's
        query text (its own included), -1 padded: false negatives to mask;
        ``negatives``: tokenized dict of (B*n, L) tensors, rows ``i*n .. i*n+n-1``
        belonging to example i; present only when n > 0.
    """

    def __init__(self, pairs: TextPairs, tokenize: Tokenize, sharding: Sharding, seed: int,
                 query_prefix: str = "", document_prefix: str = "", device: torch.device | str = "cpu") -> None:
        self.pairs, self.tokenize, self.sharding, self.seed = pairs, tokenize, sharding, seed
        self.query_prefix, self.document_prefix = query_prefix, document_prefix
        self.device = torch.device(device)
        self.steps_per_epoch = sharding.steps_per_epoch(len(pairs))
        self._ids = pairs.ids()
        sets = pairs.positive_id_sets()
        # (N, E) every positive id of each example's query, -1 padded: the false negatives to mask.
        width = max(len(s) for s in sets)
        self._exclude = torch.full((len(sets), width), -1, dtype=torch.long)
        for i, s in enumerate(sets):
            self._exclude[i, : len(s)] = torch.tensor(sorted(s), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.pairs)

    def texts(self, indices: Sequence[int]) -> dict[str, list[str]]:
        """The prefixed texts of these examples: query (B,), positive (B,), negatives (B*n,)."""
        exs = [self.pairs[int(i)] for i in indices]
        q, d = self.query_prefix, self.document_prefix
        return {"query": [q + ex.query for ex in exs], "positive": [d + ex.positive for ex in exs],
                "negatives": [d + t for ex in exs for t in ex.negatives]}

    def collate(self, indices: Tensor) -> dict[str, Any]:
        """Build (and tokenize) the batch of these (B,) example indices."""
        texts = self.texts(indices.tolist())
        batch: dict[str, Any] = {"query": self._tok(texts["query"]), "positive": self._tok(texts["positive"]),
                                 "ids": self._ids[indices].to(self.device),
                                 "exclude": self._exclude[indices].to(self.device)}
        if self.pairs.num_negatives:
            batch["negatives"] = self._tok(texts["negatives"])
        return batch

    def _tok(self, texts: list[str]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in self.tokenize(texts).items()}

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Batches ``start_step .. steps_per_epoch-1`` of this epoch (see the class docstring)."""
        perm = epoch_permutation(len(self.pairs), self.seed, epoch)
        for step in range(start_step, self.steps_per_epoch):
            yield self.collate(self.sharding.local_indices(perm, step))
