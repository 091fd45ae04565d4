"""A documents file for a negative bank: the corpus a user mines hard negatives from.

Formats, by extension:

- ``.jsonl``: one JSON object a line. BEIR's ``corpus.jsonl`` layout (``_id``, ``text``, optional
  ``title``; a document is ``(title + " " + text).strip()`` as in BEIR), or objects with a ``text`` field
  and no ``_id`` (the id is then the line number);
- ``.tsv`` / ``.txt``: one text a line (the id is the line number; tabs inside a line are kept).

Every problem is a ValueError naming the file and, where there is one, the line (counted from 1): a missing
or empty file, a line that is not JSON or not an object, a missing or empty text, a duplicate ``_id``.
"""
from __future__ import annotations

import json
from pathlib import Path

FORMATS = (".jsonl", ".tsv", ".txt")


def load_documents(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, texts) of a documents file, in file order; blank lines are skipped (not counted out)."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"documents file {path}: unknown extension {path.suffix!r}; expected one of "
                         f"{', '.join(FORMATS)} (BEIR corpus.jsonl, or one text per line)")
    if not path.is_file():
        raise ValueError(f"documents file {path} does not exist")
    ids, texts = (_read_jsonl if path.suffix.lower() == ".jsonl" else _read_lines)(path)
    if not texts:
        raise ValueError(f"documents file {path} holds no documents")
    return ids, texts


def _read_lines(path: Path) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\r\n").strip()
            if text:
                ids.append(str(number))
                texts.append(text)
    return ids, texts


def _read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    ids, texts, seen = [], [], {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            if "text" not in row:
                raise ValueError(f'{path}, line {number}: missing the "text" field (BEIR corpus.jsonl: '
                                 '{"_id": ..., "title": ..., "text": ...})')
            text = str(row["text"] or "")
            if row.get("title"):
                text = f"{row['title']} {text}"
            text = text.strip()
            if not text:
                raise ValueError(f"{path}, line {number}: empty document text")
            doc_id = str(row["_id"]) if "_id" in row else str(number)
            if doc_id in seen:
                raise ValueError(f"{path}, line {number}: duplicate _id {doc_id!r} (first on line {seen[doc_id]})")
            seen[doc_id] = number
            ids.append(doc_id)
            texts.append(text)
    return ids, texts
