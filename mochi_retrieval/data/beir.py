"""Load a retrieval data set in the BEIR folder layout, with strict validation.

Layout (https://github.com/beir-cellar/beir)::

    DIR/corpus.jsonl        {"_id": "d1", "title": "...", "text": "..."} per line
    DIR/queries.jsonl       {"_id": "q1", "text": "..."} per line
    DIR/qrels/<split>.tsv   query-id <TAB> corpus-id <TAB> score, with a header line

As in BEIR, a document is encoded as ``(title + " " + text).strip()``, and the
queries evaluated are those the split's qrels judge (in ``queries.jsonl``
order). Every problem is an :class:`EvalInputError` whose message says what
is wrong and where: missing files, unparsable lines, duplicate ids, qrels that
name unknown query or document ids (with a count and a few examples), an empty
split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mochi_retrieval.errors import EvalInputError
from mochi_retrieval.metrics import Qrels

logger = logging.getLogger(__name__)

_SHOW = 5  # how many offending ids an error message lists


@dataclass
class BeirData:
    """A loaded split. ``qrels`` is ``{query_id: {doc_id: grade}}``."""

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]

    def qrels_tensor(self) -> Qrels:
        """The judgements in index space, for :func:`mochi_retrieval.metrics.compute_metrics`."""
        return Qrels.from_dict(self.qrels, self.query_ids, self.doc_ids)


def _few(items: list[str]) -> str:
    shown = ", ".join(repr(x) for x in items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "_id" not in row:
                raise EvalInputError(f'{path}:{lineno}: expected a JSON object with an "_id" field')
            yield lineno, row


def _load_texts(path: Path, with_title: bool) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    dups: list[str] = []
    for lineno, row in _read_jsonl(path):
        if "text" not in row:
            raise EvalInputError(f'{path}:{lineno}: missing the "text" field')
        rid = str(row["_id"])
        if rid in seen:
            dups.append(rid)
            continue
        seen.add(rid)
        text = str(row["text"] or "")
        if with_title and row.get("title"):
            text = f"{row['title']} {text}"
        ids.append(rid)
        texts.append(text.strip())
    if dups:
        raise EvalInputError(f"{path}: {len(dups)} duplicate _id values: {_few(dups)}")
    return ids, texts


def _load_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.rstrip("\n\r").split("\t")
            if len(cols) != 3:
                raise EvalInputError(f"{path}:{lineno}: expected 3 tab-separated columns "
                                     f"(query-id, corpus-id, score), got {len(cols)}")
            try:
                score = int(float(cols[2]))
            except ValueError:
                if lineno == 1:  # the header line, "query-id corpus-id score"
                    continue
                raise EvalInputError(f"{path}:{lineno}: score {cols[2]!r} is not a number") from None
            qrels.setdefault(cols[0], {})[cols[1]] = score
    return qrels


def check_beir_layout(root: Path, split: str) -> None:
    """Raise :class:`EvalInputError` naming every file the layout lacks."""
    if not root.is_dir():
        raise EvalInputError(f"data folder {root} does not exist or is not a directory")
    wanted = [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"]
    missing = [str(p.relative_to(root)) for p in wanted if not p.is_file()]
    if not missing:
        return
    msg = f"{root} is not a BEIR data folder: missing {', '.join(missing)}"
    splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
    if splits:
        msg += f" (qrels has splits: {', '.join(splits)}; choose one with --split)"
    raise EvalInputError(msg)


def load_beir(root: str | Path, split: str = "test") -> BeirData:
    """Load and validate ``root`` for ``split``.

    Raises:
        EvalInputError: the layout is incomplete, a file is malformed, ids
            repeat, the split is empty, or the qrels name unknown ids.
    """
    root = Path(root)
    check_beir_layout(root, split)
    doc_ids, doc_texts = _load_texts(root / "corpus.jsonl", with_title=True)
    all_qids, all_qtexts = _load_texts(root / "queries.jsonl", with_title=False)
    qrels_path = root / "qrels" / f"{split}.tsv"
    qrels = _load_qrels(qrels_path)
    if not doc_ids:
        raise EvalInputError(f"{root / 'corpus.jsonl'} holds no documents")
    if not qrels:
        raise EvalInputError(f"{qrels_path} holds no judgements: the split {split!r} is empty")
    known_q, known_d = set(all_qids), set(doc_ids)
    bad_q = [q for q in qrels if q not in known_q]
    bad_d = sorted({d for docs in qrels.values() for d in docs if d not in known_d})
    problems = []
    if bad_q:
        problems.append(f"{len(bad_q)} query ids not in queries.jsonl: {_few(bad_q)}")
    if bad_d:
        problems.append(f"{len(bad_d)} document ids not in corpus.jsonl: {_few(bad_d)}")
    if problems:
        raise EvalInputError(f"{qrels_path} names unknown ids: " + "; ".join(problems))
    keep = [i for i, q in enumerate(all_qids) if q in qrels]
    no_rel = sum(1 for i in keep if not any(g > 0 for g in qrels[all_qids[i]].values()))
    if no_rel:
        logger.warning("%d of %d queries have no relevant document (grade > 0); they score 0", no_rel, len(keep))
    logger.info("loaded %s: %d documents, %d queries, split %r", root, len(doc_ids), len(keep), split)
    return BeirData(doc_ids, doc_texts, [all_qids[i] for i in keep], [all_qtexts[i] for i in keep], qrels)
