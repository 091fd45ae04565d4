"""What a text bank holds (``bank.corpus``): the training pairs' documents, the whole corpus, or a documents
file; the eval split's documents left out; every positive of a query masked (from the qrels, not from the
drawn pairs); documents files read with errors that name the file and the line."""
import json
from pathlib import Path

import pytest
import torch
from test_text_train import CONFIG, make_tiny_beir, text_overrides

from mochi_retrieval import train
from mochi_retrieval.config import load_config
from mochi_retrieval.data.documents import load_documents
from mochi_retrieval.training.text import bank_documents, leave_out_eval_documents, load_pairs


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- documents files
def test_beir_corpus_and_one_text_per_line_files(tmp_path):
    beir = write(tmp_path / "c.jsonl", '{"_id": "a", "title": "T", "text": "one"}\n\n{"_id": "b", "text": "two"}\n')
    assert load_documents(beir) == (["a", "b"], ["T one", "two"])
    plain = write(tmp_path / "c2.jsonl", '{"text": "x"}\n{"text": "y"}\n')
    assert load_documents(plain) == (["1", "2"], ["x", "y"])
    tsv = write(tmp_path / "c.tsv", "first doc\n\nsecond\tdoc\n")
    assert load_documents(tsv) == (["1", "3"], ["first doc", "second\tdoc"])


@pytest.mark.parametrize("name, text, message", [
    ("c.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"\n', r"c.jsonl, line 2: not valid JSON"),
    ("c.jsonl", '{"_id": "a", "text": "x"}\n["x"]\n', r"line 2: expected a JSON object, got list"),
    ("c.jsonl", '{"_id": "a", "body": "x"}\n', r'line 1: missing the "text" field'),
    ("c.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "a", "text": "z"}\n',
     r"line 2: duplicate _id 'a' \(first on line 1\)"),
    ("c.jsonl", '{"_id": "a", "text": "  "}\n', r"line 1: empty document text"),
    ("c.jsonl", "\n\n", r"holds no documents"),
    ("c.csv", "x\n", r"unknown extension '.csv'"),
])
def test_malformed_documents_files_are_clear_errors(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        load_documents(write(tmp_path / name, text))


def test_missing_documents_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- what the bank holds
def _cfg(tmp_path, beir, model_dir, **extra):
    return load_config(CONFIG, text_overrides(model_dir, beir, tmp_path / "run", **extra))


def test_bank_corpus_choices_and_the_eval_split_left_out(tmp_path, tiny_text_model_dir):
    beir = make_tiny_beir(tmp_path / "beir")
    cfg = _cfg(tmp_path, beir, tiny_text_model_dir, **{"bank.corpus": "all"})
    pairs = load_pairs(cfg)
    docs, ids = bank_documents(cfg, pairs)
    assert ids.tolist() == list(range(26)) and docs == pairs.doc_space()
    groups = torch.arange(len(docs))
    kept = leave_out_eval_documents(cfg, ids, groups)
    test_docs = {i for i in range(25) if i % 5 == 2}  # d2, d7, ... are judged in the test split
    assert set(kept.tolist()) == set(range(26)) - test_docs
    keep_all = _cfg(tmp_path, beir, tiny_text_model_dir,
                    **{"bank.corpus": "all", "bank.include_eval_documents": "true"})
    assert torch.equal(leave_out_eval_documents(keep_all, ids, groups), ids)
    # Identical text to an eval document is left out too (what the encoder sees is the same).
    groups[0] = groups[2]
    assert 0 not in leave_out_eval_documents(cfg, ids, groups).tolist()
    pairs_cfg = _cfg(tmp_path, beir, tiny_text_model_dir, **{"bank.corpus": "pairs"})
    _, pair_ids = bank_documents(pairs_cfg, pairs)
    assert torch.equal(pair_ids, pairs.training_doc_ids())


def test_documents_file_extends_the_document_space(tmp_path, tiny_text_model_dir):
    beir = make_tiny_beir(tmp_path / "beir")
    extra = write(tmp_path / "extra.jsonl", json.dumps({"_id": "d1", "title": "", "text": "the red dog sat on the mat "
                                                        "in the house"}) + "\n" + json.dumps(
        {"_id": "d1", "text": "a new document about a fox"}).replace('"d1"', '"x9"') + "\n")
    cfg = _cfg(tmp_path, beir, tiny_text_model_dir, **{"bank.corpus": str(extra)})
    pairs = load_pairs(cfg)
    docs, ids = bank_documents(cfg, pairs)
    assert ids.tolist() == sorted({1, 26} | set(pairs.training_doc_ids().tolist()))  # d1: the data set's; x9: new
    assert docs[26] == "a new document about a fox" and len(docs) == 27


def test_bank_corpus_all_needs_a_corpus(tmp_path, tiny_text_model_dir):
    pairs_file = write(tmp_path / "pairs.jsonl", '{"query": "red cat", "positive": "the red cat"}\n' * 3)
    cfg = _cfg(tmp_path, pairs_file, tiny_text_model_dir, **{"bank.corpus": "all"})
    with pytest.raises(ValueError, match="bank.corpus=all needs a data set with a corpus"):
        bank_documents(cfg, load_pairs(cfg))


def test_a_querys_undrawn_positives_stay_masked_under_data_limit(tmp_path, tiny_text_model_dir):
    """q1 has two relevant documents (d1, d3). Whatever pairs data.limit draws, q1's exclusion set holds both:
    masking follows the qrels, not the drawn pairs."""
    beir = make_tiny_beir(tmp_path / "beir")
    for seed in range(6):
        cfg = _cfg(tmp_path, beir, tiny_text_model_dir, **{"data.limit": 6, "seed": seed})
        pairs = load_pairs(cfg)
        for ex, positives in zip(pairs.examples, pairs.positive_id_sets()):
            if ex.query == "red dog":
                assert positives == {1, 3}, (seed, ex)


# --------------------------------------------------------------------------- end to end
def test_pairs_file_with_a_corpus_file_trains(tmp_path, tiny_text_model_dir, capsys):
    """The pinned command: data.dataset=text_pairs data.root=PAIRS.jsonl bank.corpus=CORPUS.jsonl."""
    words = ["cat", "dog", "bird", "fish", "fox", "house", "tree", "mat"]
    rows = [{"query": f"the {w}", "positive": f"a {w} sat on the mat"} for w in words]
    pairs_file = write(tmp_path / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    corpus = write(tmp_path / "corpus.jsonl", "".join(
        json.dumps({"_id": f"c{i}", "title": "", "text": f"the {a} {b} ran under the tree"}) + "\n"
        for i, (a, b) in enumerate((a, b) for a in words for b in ["big", "small", "red"])))
    out = tmp_path / "run"
    args = text_overrides(tiny_text_model_dir, pairs_file, out, **{
        "bank.corpus": str(corpus), "bank.max_staleness": 3, "bank.refresh_every": 0, "bank.mined_negatives": 1,
        "moco.queue_size": 0, "mochi.enabled": "false"})
    assert train.main([str(CONFIG), *args]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["bank_documents"] == 24 + 8 and results["bank_rolling_seconds"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["bank_staleness_max"] <= 3 for r in records if "bank_staleness_max" in r)


def test_malformed_corpus_file_fails_before_training_and_keeps_earlier_output(tmp_path, tiny_text_model_dir, capsys):
    beir = make_tiny_beir(tmp_path / "beir")
    bad = write(tmp_path / "bad.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n')
    out = tmp_path / "run"
    out.mkdir()
    write(out / "notes.txt", "mine")
    code = train.main([str(CONFIG), *text_overrides(tiny_text_model_dir, beir, out, **{"bank.corpus": str(bad)})])
    assert code != 0
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2: not valid JSON" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_a_positive_outside_the_bank_still_masks_its_identical_texts():
    """Doc 8 repeats doc 0's text. With doc 0 out of the bank, the bank cannot know doc 0's group from its own
    rows: the query's exclusion groups must reach the search, or doc 8 is served as doc 0's query's negative."""
    from test_text_model import DOCS, GROUPS, T, ToyTextEncoder, batch_of

    from mochi_retrieval.bank import BankSettings
    from mochi_retrieval.text_model import BankCorpus, TextMoCo

    enc = ToyTextEncoder()
    ids = torch.arange(1, len(DOCS))
    model = TextMoCo(enc, GROUPS, queue_size=0, temperature=T, in_batch_negatives=True,
                     bank=BankSettings(candidates=8, backend="torch", device="cpu"),
                     bank_corpus=BankCorpus(ids, [DOCS[i] for i in ids.tolist()]))
    model(**batch_of(enc, [0, 4]), step=0)
    served = model.bank.rows.ids_of(model.bank.last_rows)
    assert 8 not in served[0].tolist() and 8 in served[1].tolist()
