"""Text pairs: loaders (BEIR, JSONL, CSV, Parquet, datasets), errors, prefixes, deterministic sharded batches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mochi_retrieval.data.images import Sharding
from mochi_retrieval.data.text_pairs import TextPair, TextPairBatches, TextPairs, duplicate_groups

ROWS = [
    {"query": f"query {i}", "positive": f"doc {i}", "negative_1": f"neg {i}a", "negative_2": f"neg {i}b"}
    for i in range(10)
]


def char_tokenize(texts: list[str], width: int = 48) -> dict[str, torch.Tensor]:
    """A fixed-width stand-in tokenizer: (B, width) character codes, so batches compare exactly."""
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    for i, t in enumerate(texts):
        codes = [ord(c) for c in t[:width]]
        ids[i, : len(codes)] = torch.tensor(codes)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def decode(tokens: dict[str, torch.Tensor]) -> list[str]:
    return ["".join(chr(c) for c in row.tolist() if c) for row in tokens["input_ids"]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    docs = [("d1", "T1", "first doc"), ("d2", "", "second doc"), ("d3", "", "third doc")]
    write_jsonl(root / "corpus.jsonl", [{"_id": i, "title": t, "text": x} for i, t, x in docs])
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": f"question {i}"} for i in range(1, 5)])
    qrels = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td3\t2\nq2\td2\t1\nq3\td1\t0\n"
    (root / "qrels" / "train.tsv").write_text(qrels)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq4\td2\t1\n")
    return root


def load(path: Path, *columns: str) -> TextPairs:
    """from_file with a datasets cache inside the test's folder (never the user's)."""
    return TextPairs.from_file(path, *columns, cache_dir=str(path.parent / "hf_cache"))


# --- loaders ---


def test_from_beir_pairs_relevant_docs_with_doc_ids(tmp_path: Path) -> None:
    pairs = TextPairs.from_beir(write_beir(tmp_path / "beir"), split="train")
    got = [(ex.query, ex.positive, ex.doc_id) for ex in pairs.examples]
    assert got == [("question 1", "T1 first doc", 0), ("question 1", "third doc", 2), ("question 2", "second doc", 1)]
    assert pairs.doc_texts == ["T1 first doc", "second doc", "third doc"]
    assert pairs.num_negatives == 0
    assert pairs.ids().tolist() == [0, 2, 1]
    assert pairs.positive_doc_sets() == [frozenset({0, 2}), frozenset({0, 2}), frozenset({1})]


def test_from_beir_missing_split_is_a_value_error(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir")
    with pytest.raises(ValueError, match=r"missing qrels/dev\.tsv.*train"):
        TextPairs.from_beir(root, split="dev")


def test_from_jsonl_numbered_negatives(tmp_path: Path) -> None:
    pairs = load(write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert len(pairs) == 10 and pairs.num_negatives == 2
    assert pairs[3] == TextPair("query 3", "doc 3", ("neg 3a", "neg 3b"), None)
    assert pairs.ids().tolist() == list(range(10))


def test_from_jsonl_list_negative_column_and_custom_names(tmp_path: Path) -> None:
    rows = [{"q": "a cat", "p": "the cat sat", "hard": ["a dog", "a fish"]}, {"q": "b", "p": "c", "hard": ["d", "e"]}]
    pairs = load(write_jsonl(tmp_path / "p.jsonl", rows), "q", "p", "hard")
    assert pairs[0].negatives == ("a dog", "a fish") and pairs.num_negatives == 2


def test_from_csv_and_parquet_match_jsonl(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet")
    want = load(write_jsonl(tmp_path / "p.jsonl", ROWS)).examples
    assert load(tmp_path / "p.csv").examples == want
    assert load(tmp_path / "p.parquet").examples == want


def test_from_dataset_without_negatives() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"query": ["a", "b"], "positive": ["x", "y"], "extra": [1, 2]})
    pairs = TextPairs.from_dataset(ds)
    assert pairs.num_negatives == 0 and pairs[1] == TextPair("b", "y")


# --- errors ---


def test_missing_columns_named_with_columns_found(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "positive": "b"}])
    want = r"p\.jsonl: missing column\(s\) 'query'; columns found: 'question', 'positive'"
    with pytest.raises(ValueError, match=want):
        load(path)


def test_empty_texts_counted_with_first_rows(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    for i in (1, 4, 5, 6, 7, 8, 9):
        rows[i]["query"] = "  "
    rows[2]["positive"] = ""
    rows[3]["negative_2"] = None
    with pytest.raises(ValueError) as err:
        load(write_jsonl(tmp_path / "p.jsonl", rows))
    msg = str(err.value)
    assert "9 empty texts" in msg
    assert "query in 7 rows: 1, 4, 5, 6, 7, ... (2 more)" in msg
    assert "positive in 1 row: 2" in msg and "negative in 1 row: 3" in msg


def test_empty_csv_cell_is_an_empty_text(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("query,positive\na,b\n,d\n")
    with pytest.raises(ValueError, match=r"1 empty texts \(query in 1 row: 1;"):
        load(tmp_path / "p.csv")


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("query positive\n")
    with pytest.raises(ValueError, match=r"unknown pairs file extension '\.txt'; expected one of \.jsonl"):
        load(tmp_path / "p.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "absent.jsonl")


def test_empty_data_set(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("query,positive\n")
    with pytest.raises(ValueError, match=r"p\.csv: the data set is empty"):
        load(tmp_path / "p.csv")
    (tmp_path / "p.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"p\.jsonl: the data set is empty"):
        load(tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="empty"):
        TextPairs([])


def test_unequal_negative_counts(tmp_path: Path) -> None:
    rows = [{"query": "a", "positive": "b", "negative": ["c"]}, {"query": "d", "positive": "e", "negative": ["f", "g"]}]
    with pytest.raises(ValueError, match=r"different numbers of negatives \(\[1, 2\]\).*rows differing: 1"):
        load(write_jsonl(tmp_path / "p.jsonl", rows))


def test_negatives_given_two_ways_and_mixed_doc_ids(tmp_path: Path) -> None:
    rows = [{"query": "a", "positive": "b", "negative": "c", "negative_1": "d"}]
    with pytest.raises(ValueError, match=r"as 'negative' or as negative_1\.\.n, not both"):
        load(write_jsonl(tmp_path / "p.jsonl", rows))
    with pytest.raises(ValueError, match="1 of 2 examples have a doc_id"):
        TextPairs([TextPair("a", "b", doc_id=0), TextPair("c", "d")])


def test_tsv_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    (tmp_path / "p.tsv").write_text("query\tpositive\tnegative\na, b\tc\td\n")
    assert load(tmp_path / "p.tsv").examples == [TextPair("a, b", "c", ("d",))]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"query": ["a"], "positive": ["b"]})})
    with pytest.raises(ValueError, match=r"DatasetDict with splits train; pass one split"):
        TextPairs.from_dataset(dd)
    assert len(TextPairs.from_dataset(dd["train"])) == 1


# --- batches ---


def make_batches(sharding: Sharding, seed: int = 3, **kw) -> TextPairBatches:
    return TextPairBatches(TextPairs([TextPair(**_ex(r)) for r in ROWS]), char_tokenize, sharding, seed, **kw)


def _ex(row: dict) -> dict:
    return {"query": row["query"], "positive": row["positive"], "negatives": (row["negative_1"], row["negative_2"])}


def test_prefixes_applied_to_queries_and_documents() -> None:
    batches = make_batches(Sharding(4), query_prefix="query: ", document_prefix="passage: ")
    batch = next(batches.epoch(0))
    i = batch["ids"].tolist()
    assert decode(batch["query"]) == [f"query: query {k}" for k in i]
    assert decode(batch["positive"]) == [f"passage: doc {k}" for k in i]
    assert decode(batch["negatives"]) == [f"passage: neg {k}{s}" for k in i for s in "ab"]


def test_batch_shapes_and_epoch_length() -> None:
    batches = make_batches(Sharding(4))
    out = list(batches.epoch(0))
    assert batches.steps_per_epoch == len(out) == 2  # 10 // 4, the remainder dropped
    assert out[0]["ids"].dtype == torch.long and out[0]["ids"].shape == (4,)
    assert out[0]["query"]["input_ids"].shape == (4, 48) and out[0]["negatives"]["input_ids"].shape == (8, 48)
    seen = torch.cat([b["ids"] for b in out])
    assert len(set(seen.tolist())) == 8


def _flat(batches: list[dict]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of every batch, keyed by its path ("query.input_ids", "ids")."""
    out = []
    for batch in batches:
        for key, value in sorted(batch.items()):
            items = sorted(value.items()) if isinstance(value, dict) else [("", value)]
            out += [(f"{key}.{sub}", t) for sub, t in items]
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(ka == kb and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(fa, fb))


def test_deterministic_per_seed_and_epoch_and_resume_is_the_tail() -> None:
    a, b = make_batches(Sharding(2)), make_batches(Sharding(2))
    full = list(a.epoch(1))
    assert _same(full, list(b.epoch(1)))
    assert _same(full[3:], list(b.epoch(1, start_step=3)))
    assert not _same(full, list(a.epoch(2)))
    assert not _same(full, list(make_batches(Sharding(2), seed=4).epoch(1)))


def test_two_processes_split_the_one_process_batches() -> None:
    one = list(make_batches(Sharding(4)).epoch(0))
    ranks = [list(make_batches(Sharding(4, world=2, rank=r)).epoch(0)) for r in range(2)]
    for step, whole in enumerate(one):
        parts = [ranks[r][step] for r in range(2)]
        assert torch.equal(torch.cat([p["ids"] for p in parts]), whole["ids"])
        for key in ("query", "positive", "negatives"):
            assert torch.equal(torch.cat([p[key]["input_ids"] for p in parts]), whole[key]["input_ids"])


def test_beir_ids_are_doc_indices(tmp_path: Path) -> None:
    pairs = TextPairs.from_beir(write_beir(tmp_path / "beir"))
    batch = next(TextPairBatches(pairs, char_tokenize, Sharding(3), seed=0).epoch(0))
    assert sorted(batch["ids"].tolist()) == [0, 1, 2] and "negatives" not in batch


def test_tiny_model_tokenisation_respects_max_length(tiny_text_model_dir: Path) -> None:
    from mochi_retrieval.encoders.text import HFTextEncoder

    enc = HFTextEncoder(tiny_text_model_dir, max_length=6)
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)
    pairs = TextPairs([TextPair(f"cat {i}", long, (long, "a dog")) for i in range(4)])
    batch = next(TextPairBatches(pairs, enc.tokenize, Sharding(2), seed=0, query_prefix="query ").epoch(0))
    assert batch["positive"]["input_ids"].shape == (2, 6)
    assert batch["negatives"]["input_ids"].shape == (4, 6)
    assert batch["query"]["input_ids"].shape[1] <= 6
    emb = enc(batch["query"])
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()


def test_duplicate_groups_normalise_whitespace() -> None:
    groups = duplicate_groups(["a b", " a  b\n", "c", "a B", "c"])
    assert groups.tolist() == [0, 0, 1, 2, 1] and groups.dtype == torch.long
    assert duplicate_groups([]).shape == (0,)
