"""Debian package descriptions as a BEIR retrieval set (query = synopsis, document = long description).

apt's English translation files (``/var/lib/apt/lists/*_i18n_Translation-en*``,
fetched by ``apt-get update -o Acquire::Languages=en``) hold one deb822
paragraph per package::

    Package: 0ad-data
    Description-md5: 26581e685027d5ae84824362a4ba59ee
    Description-en: Real-time strategy game of ancient warfare (data files)
     0 A.D. (pronounced "zero ey-dee") is a free, open-source, cross-platform
     ...
     .
     This package contains the main data files required by 0 A.D.

Building (``python -m mochi_retrieval.data.debian OUT_DIR``) writes the BEIR
layout that :func:`mochi_retrieval.data.beir.load_beir` reads:
``corpus.jsonl``, ``queries.jsonl`` and ``qrels/{train,dev,test}.tsv``.

Choices, and why:

- A document is the cleaned long description (continuation space removed,
  `` .`` lines become paragraph breaks, wrapped lines joined, verbatim lines
  kept on their own lines, runs of spaces collapsed). Its title is empty: the
  synopsis is the query and must not leak into the document.
- Identical cleaned descriptions are ONE document (families of packages, such
  as the dozens of GCC cross compilers, share them). Its id is ``d`` + the
  first 16 hex digits of the sha1 of the text, so ids are stable across rebuilds.
- Split by that hash: a document, and with it every query judged on it, falls
  in one split, and a rebuild gives the same split. Families whose documents
  differ (``libfoo1`` vs ``libfoo-dev``) often share a first paragraph, so by
  default a test document may open like a train one (on bookworm: 44% of test
  documents); ``split_key="first-paragraph"`` hashes the first paragraph
  instead and keeps such families in one split.
- One query per distinct (split, synopsis text), relevant to every document of
  that split it describes. Identical query texts are indistinguishable to any
  encoder, so separate copies with one relevant document each would make a
  perfect model look wrong, and duplicate training pairs add nothing.
- Packages listed in several files (a suite and its -security update) with the
  same description count once; a package whose description changed between
  files contributes both descriptions.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import logging
import lzma
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from mochi_retrieval.files import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_LISTS = "/var/lib/apt/lists"
FETCH_COMMAND = "apt-get update -o Acquire::Languages=en"
APT_HELPER = "/usr/lib/apt/apt-helper"
SPLITS = ("train", "dev", "test")
_PY_DECOMPRESS = {".gz": gzip.decompress, ".xz": lzma.decompress, ".lzma": lzma.decompress, ".bz2": bz2.decompress}
_APT_ONLY = {".lz4", ".zst"}


class DebianDataNotFoundError(FileNotFoundError):
    """No translation files were found; the message gives the apt command that fetches them."""


def translation_files(lists_dir: str | Path = DEFAULT_LISTS) -> list[Path]:
    """``*_i18n_Translation-en`` files in ``lists_dir`` (plain or compressed; not ``en_GB``), sorted."""
    out = []
    for path in sorted(Path(lists_dir).glob("*_i18n_Translation-en*")):
        rest = path.name.split("_i18n_Translation-en", 1)[1]
        if path.is_file() and (rest == "" or rest in _PY_DECOMPRESS or rest in _APT_ONLY):
            out.append(path)
    return out


def read_text(path: str | Path) -> str:
    """A translation file's text: plain, gz/xz/bz2 via Python, lz4/zst via ``apt-helper cat-file``."""
    path = Path(path)
    suffix = path.suffix if path.suffix in _PY_DECOMPRESS or path.suffix in _APT_ONLY else ""
    if suffix in _PY_DECOMPRESS:
        return _PY_DECOMPRESS[suffix](path.read_bytes()).decode("utf-8", errors="replace")
    if not suffix:
        return path.read_text(encoding="utf-8", errors="replace")
    helper = APT_HELPER if Path(APT_HELPER).exists() else shutil.which("apt-helper")
    if helper is None:
        raise RuntimeError(f"{path}: {suffix} files are read with apt-helper cat-file, which is not installed")
    done = subprocess.run([helper, "cat-file", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{path}: apt-helper cat-file failed (exit {done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode("utf-8", errors="replace")


def parse_paragraphs(text: str) -> Iterator[dict[str, list[str]]]:
    """deb822 paragraphs as ``{field: [first line value, continuation lines...]}`` (raw lines)."""
    fields: dict[str, list[str]] = {}
    last = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, None
        elif line[0] in " \t":
            if last is not None:
                fields[last].append(line)
        else:
            key, _, value = line.partition(":")
            last = key.strip()
            fields[last] = [value.strip()]
    if fields:
        yield fields


def clean_description(lines: Sequence[str]) -> str:
    """Continuation lines of a Description field -> readable text.

    `` .`` separates paragraphs (blank line in the output); a line starting
    with one space is wrapped text (joined with spaces); a line starting with
    two or more is verbatim (kept on its own line). Spaces are collapsed.
    """
    paragraphs: list[str] = []
    current = ""
    for raw in lines:
        line = raw[1:] if raw[:1] in (" ", "\t") else raw
        words = " ".join(line.split())
        if words == ".":
            if current:
                paragraphs.append(current)
            current = ""
        elif words:
            sep = "\n" if line[:1] in (" ", "\t") else " "
            current = f"{current}{sep}{words}" if current else words
    if current:
        paragraphs.append(current)
    return "\n\n".join(paragraphs)


def text_id(prefix: str, *parts: str) -> str:
    """Stable id: ``prefix`` + 16 hex digits of the sha1 of the tab-joined parts."""
    return prefix + hashlib.sha1("\t".join(parts).encode("utf-8")).hexdigest()[:16]


def split_of(key: str, dev_share: float, test_share: float) -> str:
    """Split from a (uniform, hex) id such as a document id: test, then dev, else train."""
    u = int(key[1:], 16) / 16 ** (len(key) - 1)
    return "test" if u < test_share else "dev" if u < test_share + dev_share else "train"


@dataclass
class BuildStats:
    """Counts of one build (see :func:`build_corpus`)."""

    files: int = 0
    entries: int = 0  # paragraphs with a Description-en field
    repeated_entries: int = 0  # same package and description seen in an earlier file
    skipped_short: int = 0  # long description with fewer than min_words words
    skipped_no_query: int = 0  # empty synopsis (the document still joins the corpus)
    duplicates_merged: int = 0  # packages whose description an earlier package already owned
    queries_merged: int = 0  # packages whose (split, synopsis) an earlier package already gave
    docs: Counter = field(default_factory=Counter)  # split -> documents
    queries: Counter = field(default_factory=Counter)  # split -> queries
    qrels: Counter = field(default_factory=Counter)  # split -> judgements

    def summary(self) -> str:
        rows = [f"{s:>5}: {self.docs[s]:>6} documents  {self.queries[s]:>6} queries  {self.qrels[s]:>6} qrels"
                for s in SPLITS]
        return "\n".join([
            f"{self.files} translation files, {self.entries} entries "
            f"({self.repeated_entries} repeated across files dropped, {self.skipped_short} with too short "
            f"descriptions skipped, {self.skipped_no_query} without a synopsis)",
            f"{sum(self.docs.values())} documents ({self.duplicates_merged} identical descriptions merged), "
            f"{sum(self.queries.values())} queries ({self.queries_merged} identical synopses merged)",
            *rows,
        ])


@dataclass
class DebianCorpus:
    """The built set: ids -> texts, owners, and judgements per split (sorted lists of (qid, did))."""

    docs: dict[str, str]
    doc_packages: dict[str, list[str]]
    queries: dict[str, str]
    query_packages: dict[str, list[str]]
    qrels: dict[str, list[tuple[str, str]]]
    stats: BuildStats


def build_corpus(
    files: Sequence[str | Path],
    dev_share: float = 0.05,
    test_share: float = 0.05,
    min_words: int = 1,
    progress: bool = True,
    split_key: str = "document",
) -> DebianCorpus:
    """Parse translation files into documents, queries and split judgements.

    ``split_key``: "document" (hash of the document text) or "first-paragraph"
    (hash of its first paragraph, keeping package families in one split).

    Raises:
        DebianDataNotFoundError: ``files`` is empty.
        ValueError: the shares are not in [0, 1) or leave no room for train.
    """
    if not files:
        raise DebianDataNotFoundError(f"no apt English translation files given; fetch them with: {FETCH_COMMAND}")
    if not (0 <= dev_share < 1 and 0 <= test_share < 1 and dev_share + test_share < 1):
        raise ValueError(f"dev_share={dev_share} and test_share={test_share} must be >= 0 with a sum below 1")
    if split_key not in ("document", "first-paragraph"):
        raise ValueError(f"split_key must be 'document' or 'first-paragraph', got {split_key!r}")
    key_of = (lambda did, body: did) if split_key == "document" else (
        lambda did, body: text_id("f", body.split("\n\n", 1)[0]))
    doc_split: dict[str, str] = {}
    stats = BuildStats(files=len(files))
    seen: set[tuple[str, str]] = set()
    docs: dict[str, str] = {}
    doc_pk: dict[str, list[str]] = {}
    queries: dict[str, str] = {}
    query_pk: dict[str, list[str]] = {}
    qrels: dict[str, set[tuple[str, str]]] = {s: set() for s in SPLITS}
    for path in files:
        text = read_text(path)
        bar = tqdm(parse_paragraphs(text), total=text.count("\nPackage:") + 1, unit="pkg",
                   desc=Path(path).name[-48:], disable=not progress, leave=False)
        for para in bar:
            desc = para.get("Description-en")
            if desc is None:
                continue
            stats.entries += 1
            package = para.get("Package", ["?"])[0]
            synopsis, body = " ".join(desc[0].split()), clean_description(desc[1:])
            if (package, synopsis + "\n" + body) in seen:
                stats.repeated_entries += 1
                continue
            seen.add((package, synopsis + "\n" + body))
            if len(body.split()) < max(min_words, 1):
                stats.skipped_short += 1
                continue
            did = text_id("d", body)
            if did in docs:
                if docs[did] != body:
                    raise RuntimeError(f"sha1 prefix collision between two documents ({did})")
                stats.duplicates_merged += 1
            docs[did] = body
            doc_pk.setdefault(did, []).append(package)
            if not synopsis:
                stats.skipped_no_query += 1
                continue
            split = doc_split.setdefault(did, split_of(key_of(did, body), dev_share, test_share))
            qid = text_id("q", split, synopsis)
            if qid in queries:
                stats.queries_merged += 1
            queries[qid] = synopsis
            query_pk.setdefault(qid, []).append(package)
            qrels[split].add((qid, did))
    for did, body in docs.items():
        stats.docs[doc_split.get(did) or split_of(key_of(did, body), dev_share, test_share)] += 1
    for split, pairs in qrels.items():
        stats.queries[split] = len({q for q, _ in pairs})
        stats.qrels[split] = len(pairs)
    return DebianCorpus(docs, doc_pk, queries, query_pk, {s: sorted(p) for s, p in qrels.items()}, stats)


def _write_lines(path: Path, lines: Iterator[str]) -> None:
    atomic_write(path, lambda f: f.writelines(line.encode("utf-8") for line in lines))
    path.chmod(0o644)  # atomic_write's temporary file is private (0600); a data set is not


def write_beir(corpus: DebianCorpus, out_dir: str | Path) -> Path:
    """Write the BEIR layout (each file atomically, rows sorted by id). Returns ``out_dir``."""
    out = Path(out_dir)
    row = lambda obj: json.dumps(obj, ensure_ascii=False) + "\n"  # noqa: E731
    _write_lines(out / "corpus.jsonl", (
        row({"_id": d, "title": "", "text": corpus.docs[d], "metadata": {"packages": sorted(corpus.doc_packages[d])}})
        for d in sorted(corpus.docs)))
    _write_lines(out / "queries.jsonl", (
        row({"_id": q, "text": corpus.queries[q], "metadata": {"packages": sorted(corpus.query_packages[q])}})
        for q in sorted(corpus.queries)))
    for split in SPLITS:
        lines = ["query-id\tcorpus-id\tscore\n"] + [f"{q}\t{d}\t1\n" for q, d in corpus.qrels[split]]
        _write_lines(out / "qrels" / f"{split}.tsv", iter(lines))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mochi_retrieval.data.debian",
        description="Build a BEIR-layout retrieval set from apt's English package descriptions "
                    "(query = synopsis, document = long description).")
    p.add_argument("out_dir", type=Path, help="output folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--lists", type=Path, default=Path(DEFAULT_LISTS), help="apt lists folder (default: %(default)s)")
    p.add_argument("--dev-share", type=float, default=0.05, help="share of documents in dev (default: %(default)s)")
    p.add_argument("--test-share", type=float, default=0.05, help="share of documents in test (default: %(default)s)")
    p.add_argument("--min-words", type=int, default=1,
                   help="skip long descriptions with fewer words (default: %(default)s, i.e. skip empty ones)")
    p.add_argument("--split-key", choices=("document", "first-paragraph"), default="document",
                   help="what the split hashes: the document text, or its first paragraph to keep "
                        "package families together (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    files = translation_files(args.lists)
    if not files:
        print(f"error: no English translation files (*_i18n_Translation-en*) in {args.lists}.\n"
              f"Fetch them (as root) with:\n    {FETCH_COMMAND}", file=sys.stderr)
        return 2
    try:
        corpus = build_corpus(files, args.dev_share, args.test_share, args.min_words, not args.no_progress,
                              args.split_key)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    share = {"train": 1 - args.dev_share - args.test_share, "dev": args.dev_share, "test": args.test_share}
    empty = [s for s in SPLITS if share[s] > 0 and corpus.stats.queries[s] == 0]
    write_beir(corpus, args.out_dir)
    print(corpus.stats.summary())
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s")
    if empty:
        print(f"error: split(s) {', '.join(empty)} hold no queries; use more data or larger shares", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
