"""Debian descriptions -> BEIR layout: parsing, merging, deterministic splits, CLI errors, real files."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mochi_retrieval.data import debian
from mochi_retrieval.data.beir import load_beir
from mochi_retrieval.data.debian import (
    FETCH_COMMAND,
    build_corpus,
    clean_description,
    main,
    translation_files,
    write_beir,
)


def _entry(package: str, synopsis: str, body: str) -> str:
    lines = [f"Package: {package}", "Description-md5: 0123456789abcdef0123456789abcdef",
             f"Description-en: {synopsis}"] + [f" {line}" if line else " ." for line in body.split("\n")]
    return "\n".join(lines) + "\n\n"


FOO = "Foo parses bar files\nquickly and well.\n\nThis is the foo library."
GCC = "This package contains the cross compiler for several architectures."
MAIN = (
    _entry("libfoo1", "Foo library (shared library)", FOO)
    + _entry("libfoo-dev", "Foo library (development files)", FOO)
    + _entry("gcc-x-arm", "GNU C compiler for cross builds", GCC)
    + _entry("gcc-x-mips", "GNU C compiler for cross builds", GCC)
    + _entry("empty-pkg", "Nothing to say", "")
    + _entry("old-a", "transitional package", "Moves to package a.")
    + _entry("old-b", "transitional package", "Moves to package b.")
)
UPDATES = _entry("libfoo1", "Foo library (shared library)", FOO) + _entry("baz", "Baz tool", "Baz does   baz.")


def _lists(tmp_path: Path, main_text: str = MAIN, updates_text: str = UPDATES) -> Path:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "mirror_dists_x_main_i18n_Translation-en").write_text(main_text, encoding="utf-8")
    (lists / "mirror_dists_x-updates_main_i18n_Translation-en.gz").write_bytes(gzip.compress(updates_text.encode()))
    (lists / "mirror_dists_x_main_i18n_Translation-en_GB").write_text(_entry("gb", "Colour", "Colour."))
    (lists / "mirror_dists_x_main_i18n_Translation-de").write_text(_entry("de", "Farbe", "Farbe."))
    return lists


def _jsonl(path: Path) -> dict[str, dict]:
    return {r["_id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def test_clean_description() -> None:
    lines = [" First line", " wrapped   here.", " .", " Features:", "  * one", "  * two", " .", " Last."]
    assert clean_description(lines) == "First line wrapped here.\n\nFeatures:\n* one\n* two\n\nLast."
    assert clean_description([" .", " ."]) == ""


def test_build_merges_and_writes_beir(tmp_path: Path) -> None:
    files = translation_files(_lists(tmp_path))
    assert sorted(f.name.split("_")[2] for f in files) == ["x", "x-updates"]  # en_GB and de ignored
    corpus = build_corpus(files, dev_share=0.0, test_share=0.0, progress=False)
    s = corpus.stats
    assert (s.entries, s.repeated_entries, s.skipped_short) == (9, 1, 1)
    assert s.duplicates_merged == 2  # libfoo-dev joins libfoo1's text, gcc-x-mips joins gcc-x-arm's
    assert sum(s.docs.values()) == 5 and s.queries["train"] == 5 and s.qrels["train"] == 6
    out = write_beir(corpus, tmp_path / "beir")
    docs, queries = _jsonl(out / "corpus.jsonl"), _jsonl(out / "queries.jsonl")
    by_text = {r["text"]: r for r in docs.values()}
    assert by_text["Foo parses bar files quickly and well.\n\nThis is the foo library."]["metadata"]["packages"] == [
        "libfoo-dev", "libfoo1"]
    assert "Baz does baz." in by_text and all(r["title"] == "" for r in docs.values())
    q_by_text = {r["text"]: r for r in queries.values()}
    assert q_by_text["GNU C compiler for cross builds"]["metadata"]["packages"] == ["gcc-x-arm", "gcc-x-mips"]
    data = load_beir(out, "train")
    trans = data.qrels[q_by_text["transitional package"]["_id"]]
    assert sorted(docs[d]["text"] for d in trans) == ["Moves to package a.", "Moves to package b."]
    foo_doc = by_text["Foo parses bar files quickly and well.\n\nThis is the foo library."]["_id"]
    assert sum(foo_doc in rel for rel in data.qrels.values()) == 2  # both synopses judge the merged document
    for split in ("dev", "test"):
        assert (out / "qrels" / f"{split}.tsv").read_text() == "query-id\tcorpus-id\tscore\n"


def _many_packages(n_families: int = 150) -> str:
    text = []
    for f in range(n_families):
        intro = f"Family {f} provides widget number {f} for testing."
        text.append(_entry(f"lib{f}", f"Widget {f} library", intro))
        text.append(_entry(f"lib{f}-dev", f"Widget {f} development files", f"{intro}\n\nHeaders for {f}."))
    return "".join(text)


def test_split_is_deterministic_and_keeps_documents_whole(tmp_path: Path) -> None:
    lists = _lists(tmp_path, _many_packages(), "")
    outs = []
    for name in ("a", "b"):
        assert main([str(tmp_path / name), "--lists", str(lists), "--dev-share", "0.2", "--test-share", "0.2",
                     "--no-progress"]) == 0
        outs.append(tmp_path / name)
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/dev.tsv", "qrels/test.tsv"):
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    doc_split: dict[str, str] = {}
    for split in ("train", "dev", "test"):
        rows = (outs[0] / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
        assert 30 < len(rows) < 240, (split, len(rows))  # 300 documents; shares 0.6 / 0.2 / 0.2
        for row in rows:
            did = row.split("\t")[1]
            assert doc_split.setdefault(did, split) == split  # a document never spans two splits


def test_first_paragraph_split_keeps_families_together(tmp_path: Path) -> None:
    files = translation_files(_lists(tmp_path, _many_packages(), ""))
    corpus = build_corpus(files, 0.2, 0.2, progress=False, split_key="first-paragraph")
    family_split: dict[str, str] = {}
    for split, pairs in corpus.qrels.items():
        for _, did in pairs:
            family = corpus.docs[did].split("\n\n")[0]
            assert family_split.setdefault(family, split) == split
    assert len(set(family_split.values())) == 3


def test_missing_files_name_the_apt_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "out"), "--lists", str(tmp_path / "empty")]) != 0
    assert FETCH_COMMAND in capsys.readouterr().err
    with pytest.raises(debian.DebianDataNotFoundError, match="apt-get update"):
        build_corpus([])


def test_bad_shares(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share"):
        build_corpus(translation_files(_lists(tmp_path)), dev_share=0.6, test_share=0.5)


REAL = translation_files()


@pytest.mark.skipif(not REAL, reason=f"no apt translation files; fetch with: {FETCH_COMMAND}")
def test_real_translation_files(tmp_path: Path) -> None:
    corpus = build_corpus(REAL, progress=False)
    s = corpus.stats
    assert sum(s.docs.values()) > 1000 and s.duplicates_merged > 0
    assert all(s.queries[split] > 0 for split in ("train", "dev", "test"))
    data = load_beir(write_beir(corpus, tmp_path / "beir"), "test")
    assert len(data.query_ids) == s.queries["test"] and all(data.doc_texts)
