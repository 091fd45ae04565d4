"""mochi_retrieval.integrations.sentence_transformers: our negatives inside SentenceTransformerTrainer.

The loss runs :class:`TextMoCo`; these tests check the bridge: the trainer runs with it, a step equals
our trainer's step on the same batch (logits and gradients, form against form), the bank refreshes on
schedule, and a resumed run continues with the same bank and weights.
"""
from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")

from mochi_retrieval.bank import BankSettings  # noqa: E402
from mochi_retrieval.loss import MoCHiConfig  # noqa: E402

WORDS = "cat dog bird fish fox mat house tree".split()
ADJ = "big small red blue fast slow quick brown lazy".split()


def pairs(n: int = 12) -> dict[str, list[str]]:
    """(query, positive) pairs over the tiny vocabulary; the last anchor repeats the first's (two positives)."""
    queries = [f"the {ADJ[i % len(ADJ)]} {WORDS[i % len(WORDS)]}" for i in range(n)]
    positives = [f"a {ADJ[(i + 3) % len(ADJ)]} {WORDS[i % len(WORDS)]} sat on the {WORDS[(i + 2) % len(WORDS)]}"
                 for i in range(n)]
    queries[-1] = queries[0]
    return {"query": queries, "positive": positives}


def corpus(n: int = 12) -> list[str]:
    extra = [f"an {ADJ[i % len(ADJ)]} {WORDS[(i + 5) % len(WORDS)]} ran under the tree" for i in range(10)]
    return pairs(n)["positive"][: n - 2] + extra  # two positives missing: the loss adds them


def st_model(path: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")  # a plain transformers folder: mean pooling


def dataset(n: int = 12):
    from datasets import Dataset

    return Dataset.from_dict(pairs(n))


def trainer_for(model, loss, out: Path, eval_dataset=None, **kwargs):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from mochi_retrieval.integrations.sentence_transformers import BankRefreshCallback

    defaults = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                    use_cpu=True, save_strategy="no", report_to=[], logging_steps=1, seed=0, data_seed=0,
                    dataloader_num_workers=0, disable_tqdm=True, warmup_steps=0)
    defaults.update(kwargs)
    args = SentenceTransformerTrainingArguments(**defaults)
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset(), eval_dataset=eval_dataset,
                                      loss=loss, callbacks=[BankRefreshCallback(loss)])


def bank_loss(model, **kwargs):
    from mochi_retrieval.integrations.sentence_transformers import BankNegativesLoss

    settings = dict(bank=BankSettings(candidates=4, mined_negatives=1, refresh_every=2, backend="torch",
                                      device="cpu"),
                    mochi=MoCHiConfig(n_hard=4, n_mix=3, n_query_mix=2), max_neg_pos_ratio=0.98)
    settings.update(kwargs)
    return BankNegativesLoss(model, dataset(), corpus(), **settings)


def test_missing_sentence_transformers_names_the_extra(monkeypatch):
    name = "mochi_retrieval.integrations.sentence_transformers"
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with pytest.raises(ImportError, match=r"mochi-retrieval\[sentence-transformers\]"):
        importlib.import_module(name)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_runs_with_the_loss_and_refreshes_on_schedule(tiny_text_model_dir, tmp_path, accumulation):
    model = st_model(tiny_text_model_dir)
    loss = bank_loss(model)
    assert len(loss.doc_texts) == 22  # 20 corpus documents + 2 positives it lacked
    before = [p.detach().clone() for p in model.parameters()]
    trainer = trainer_for(model, loss, tmp_path, gradient_accumulation_steps=accumulation,
                          per_device_train_batch_size=4 // accumulation)
    history = trainer.train()
    assert torch.isfinite(torch.tensor(history.training_loss))
    # the initial pass, then every refresh_every=2 optimiser steps (not micro-batches)
    assert [r["step"] for r in loss.engine.refresh_log] == [0, 2]
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    out = loss.last_output
    assert out["neg_logits"].shape[0] == 4 // accumulation and torch.isfinite(out["pos_logits"]).all()


def test_bf16_and_evaluation_leave_the_bank_alone(tiny_text_model_dir, tmp_path):
    """bf16 autocast trains; the trainer's eval_dataset gets the in-batch loss and never writes the bank."""
    model = st_model(tiny_text_model_dir)
    loss = bank_loss(model)
    trainer = trainer_for(model, loss, tmp_path, dataset(), max_steps=2, bf16=True, eval_strategy="steps",
                          eval_steps=2, per_device_eval_batch_size=4)
    trainer.train()
    assert loss.last_output["q"].dtype == torch.float32 and torch.isfinite(loss.last_output["neg_logits"]).any()
    bank = loss.engine.bank.embeddings.clone()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert torch.equal(loss.engine.bank.embeddings, bank)


def test_loss_without_its_callback_says_so(tiny_text_model_dir):
    model = st_model(tiny_text_model_dir)
    loss = bank_loss(model)
    features = [model.preprocess(pairs()["query"][:2]), model.preprocess(pairs()["positive"][:2])]
    with pytest.raises(RuntimeError, match="BankRefreshCallback"):
        loss(features, None)


def test_bad_input_is_named(tiny_text_model_dir):
    from datasets import Dataset

    from mochi_retrieval.integrations.sentence_transformers import BankNegativesLoss

    model = st_model(tiny_text_model_dir)
    with pytest.raises(ValueError, match="corpus is empty"):
        BankNegativesLoss(model, dataset(), [])
    with pytest.raises(ValueError, match=r"corpus: 1 empty or non-text entries \(rows 1"):
        BankNegativesLoss(model, dataset(), ["a cat", "  "])
    with pytest.raises(ValueError, match="two text columns, got 3"):
        BankNegativesLoss(model, Dataset.from_dict({**pairs(), "negative": pairs()["positive"]}))
    with pytest.raises(ValueError, match="bank.candidates=40"):
        BankNegativesLoss(model, dataset(), corpus(), bank=BankSettings(candidates=40))
    loss = BankNegativesLoss(model, dataset(), corpus())
    loss.begin_step(0, 0.0)
    features = [model.preprocess(["the cat"]), model.preprocess(["a fox jumps over the house"])]
    with pytest.raises(ValueError, match="not in the loss's documents"):
        loss(features, None)


def test_prompts_must_agree_with_the_trainer(tiny_text_model_dir, tmp_path):
    model = st_model(tiny_text_model_dir)
    loss = bank_loss(model)
    trainer = trainer_for(model, loss, tmp_path, prompts={"positive": "document: "})
    with pytest.raises(ValueError, match="document_prompt='document: '"):
        trainer.train()


def reference_model(tiny_text_model_dir: Path, settings: dict):
    """Our trainer's objects on the same pairs: TextPairs, its batches and a TextMoCo as build_text_model
    makes it (doc space = each pair's positive, bank over the training positives)."""
    from mochi_retrieval.data.images import Sharding
    from mochi_retrieval.data.text_pairs import TextPairBatches, TextPairs, family_groups, token_groups
    from mochi_retrieval.encoders import HFTextEncoder
    from mochi_retrieval.text_model import BankCorpus, TextMoCo

    text_pairs = TextPairs.from_dataset(dataset())
    encoder = HFTextEncoder(tiny_text_model_dir, pooling="mean", max_length=512)
    docs = text_pairs.doc_space()
    ids = text_pairs.training_doc_ids()
    groups, table = token_groups(docs, encoder.tokenize)
    model = TextMoCo(encoder, groups, queue_size=0, temperature=0.05, mochi=settings["mochi"], bank=settings["bank"],
                     bank_corpus=BankCorpus(ids, [docs[i] for i in ids.tolist()]),
                     max_neg_pos_ratio=settings["max_neg_pos_ratio"], doc_families=family_groups(docs),
                     token_groups=table, seed=0)
    return model, TextPairBatches(text_pairs, encoder.tokenize, Sharding(4), seed=0)


def bert_name(name: str) -> str:
    """A BertModel parameter's name inside any wrapper: from its first 'embeddings.' or 'encoder.'."""
    return name[min(i for i in (name.find("embeddings."), name.find("encoder.")) if i >= 0):]


def test_a_step_equals_our_trainers_step(tiny_text_model_dir):
    """Form against form: same weights, batch, bank and step -> the same logits and gradients."""
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from mochi_retrieval.integrations.sentence_transformers import BankNegativesLoss

    settings = dict(bank=BankSettings(candidates=3, mined_negatives=2, refresh_every=0, backend="torch",
                                      device="cpu"),
                    mochi=MoCHiConfig(n_hard=4, n_mix=3, n_query_mix=2), max_neg_pos_ratio=0.98)
    reference, batches = reference_model(tiny_text_model_dir, settings)
    model = st_model(tiny_text_model_dir)
    loss = BankNegativesLoss(model, dataset(), pairs()["positive"], **settings)  # corpus = the positives
    assert loss.doc_texts == pairs()["positive"]
    loss.eval(), reference.eval()  # no dropout: the two networks are the same function
    rows = [11, 3, 0, 5]  # rows 11 and 0 share their query: each other's positive is masked for both
    batch = batches.collate(torch.tensor(rows))
    collate = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)
    features = [{k[len(c) + 1:]: v for k, v in collate([dataset()[i] for i in rows]).items() if k.startswith(c)}
                for c in ("query", "positive")]

    reference.refresh_bank(0)
    loss.engine.refresh_bank(0)
    torch.testing.assert_close(loss.engine.bank.embeddings, reference.bank.embeddings)
    for step in (0, 1):  # two steps: the second sees the bank rows the first wrote
        loss.begin_step(step, 0.0)
        got = loss(features, None)
        ref = reference(batch["query"], batch["positive"], batch["ids"], batch["exclude"], epoch=0.0, step=step)
        mine = loss.last_output
        torch.testing.assert_close(mine["q"], ref["q"])
        torch.testing.assert_close(mine["k"], ref["k"])
        torch.testing.assert_close(mine["pos_logits"], ref["pos_logits"])
        torch.testing.assert_close(mine["neg_logits"], ref["neg_logits"])
        assert mine["neg_logits"].shape == (4, 4 + 4 * 2 + 3)  # in-batch, mined (re-encoded), bank vectors
        torch.testing.assert_close(got, ref["loss"])
        assert bool(mine["neg_logits"].isinf().any())  # masked entries (the shared query's other positive)
        got.backward()
        ref["loss"].backward()
        grads = {bert_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
        ref_grads = {bert_name(n): p.grad for n, p in reference.encoder.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys() and len(grads) > 10
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
        model.zero_grad(), reference.zero_grad()
    torch.testing.assert_close(loss.engine.bank.embeddings, reference.bank.embeddings)


def test_a_resumed_run_continues_with_the_same_bank(tiny_text_model_dir, tmp_path):
    from mochi_retrieval.integrations.sentence_transformers import BANK_STATE_FILE, read_bank_state

    whole, first = tmp_path / "whole", tmp_path / "resumed"
    model = st_model(tiny_text_model_dir)
    loss = bank_loss(model, bank=BankSettings(candidates=4, mined_negatives=1, refresh_every=3, backend="torch",
                                              device="cpu"))
    trainer_for(model, loss, whole, max_steps=4, save_strategy="steps", save_steps=2).train()
    assert [r["step"] for r in loss.engine.refresh_log] == [0, 3]
    saved = read_bank_state(whole / "checkpoint-2" / BANK_STATE_FILE)
    assert int(saved["step"]) == 2 and saved["bank.embeddings"].shape == (22, 32)

    shutil.copytree(whole / "checkpoint-2", first / "checkpoint-2")  # as if the first run stopped there
    model2 = st_model(tiny_text_model_dir)
    loss2 = bank_loss(model2, bank=BankSettings(candidates=4, mined_negatives=1, refresh_every=3, backend="torch",
                                                device="cpu"))
    trainer_for(model2, loss2, first, max_steps=4, save_strategy="steps", save_steps=2).train(
        resume_from_checkpoint=True)
    assert [r["step"] for r in loss2.engine.refresh_log] == [3]  # loaded at 2, no initial pass; refreshed at 3
    torch.testing.assert_close(loss2.engine.bank.embeddings, loss.engine.bank.embeddings)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        torch.testing.assert_close(p2, p, msg=name)


def test_a_resume_without_bank_state_says_where_it_looked(tiny_text_model_dir, tmp_path):
    model = st_model(tiny_text_model_dir)
    trainer_for(model, bank_loss(model), tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2).train()
    (tmp_path / "a" / "checkpoint-2" / "mochi_bank_state.pt").unlink()
    model2 = st_model(tiny_text_model_dir)
    trainer = trainer_for(model2, bank_loss(model2), tmp_path / "a", max_steps=4)
    with pytest.raises(FileNotFoundError, match="resume_from=FOLDER"):
        trainer.train(resume_from_checkpoint=True)


# ------------------------------------------------------------------ the example and the guide
ROOT = Path(__file__).parents[1]


def write_files(folder: Path) -> tuple[Path, Path]:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    data = pairs()
    with (folder / "pairs.jsonl").open("w") as f:
        for q, p in zip(data["query"], data["positive"]):
            f.write(json.dumps({"query": q, "positive": p}) + "\n")
    with (folder / "corpus.jsonl").open("w") as f:
        for i, text in enumerate(corpus()):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    return folder / "pairs.jsonl", folder / "corpus.jsonl"


def test_the_example_runs_as_written(tiny_text_model_dir, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import sentence_transformers_bank as example

    pairs_file, corpus_file = write_files(tmp_path / "data")
    out = tmp_path / "model"
    assert example.main(["--pairs", str(pairs_file), "--corpus", str(corpus_file), "--max-steps", "2",
                         "--output-dir", str(out), "--model-path", str(tiny_text_model_dir),
                         "--batch-size", "4"]) == 0
    trained = SentenceTransformer(str(out), device="cpu")
    assert trained.encode(["the big cat"]).shape == (1, 32)


def test_the_guide_shows_the_examples_code():
    import re

    guide = (ROOT / "docs/guides/sentence_transformers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    assert (ROOT / "examples/sentence_transformers_bank.py").read_text() in blocks
    assert "docs/guides/sentence_transformers.md" in (ROOT / "README.md").read_text()


def test_the_readers_name_the_file_and_line(tmp_path):
    from mochi_retrieval.integrations.sentence_transformers import read_beir_corpus, read_pairs_jsonl

    pairs_file, corpus_file = write_files(tmp_path)
    assert read_pairs_jsonl(pairs_file).column_names == ["query", "positive"]
    assert len(read_beir_corpus(corpus_file)) == 20
    pairs_file.write_text('{"query": "a cat", "positive": "a cat sat"}\n{"query": "a dog", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl: 1 empty texts \(positive in 1 row: 1"):
        read_pairs_jsonl(pairs_file)
    pairs_file.write_text('{"query": "a cat", "positive": "a cat sat"}\n{"query": "a dog", \n')
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 2: not valid JSON"):
        read_pairs_jsonl(pairs_file)
    corpus_file.write_text('{"_id": "d1", "text": "a cat"}\n{"_id": "d2", "text": \n')
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 2: not valid JSON"):
        read_beir_corpus(corpus_file)
    corpus_file.write_text("\n")
    with pytest.raises(ValueError, match="holds no documents"):
        read_beir_corpus(corpus_file)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_pairs_jsonl(tmp_path / "missing.jsonl")


DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_st_integration as t
from mochi_retrieval.distributed import replicas_agree

model = t.st_model(Path({model!r}))
loss = t.bank_loss(model)
trainer = t.trainer_for(model, loss, Path({out!r}), max_steps=3, per_device_train_batch_size=2,
                        ddp_backend="gloo", save_strategy="steps", save_steps=3)
trainer.train()
state = {{"bank": loss.engine.bank.embeddings, "weights": next(model.parameters()).detach()}}
result = {{"disagree": replicas_agree(state), "refreshes": [r["step"] for r in loss.engine.refresh_log],
          "neg_logits": list(loss.last_output["neg_logits"].shape)}}
Path({out!r}, "rank" + os.environ["RANK"] + ".json").write_text(json.dumps(result))
from mochi_retrieval.distributed import exit_launched_process
exit_launched_process(0)  # DDP keeps gloo's threads alive into the interpreter's teardown, which they can abort
"""


def test_two_processes_share_one_bank(tiny_text_model_dir, tmp_path):
    """torchrun, 2 processes (gloo), 2 pairs each: both hold the same bank and weights after 3 steps, every
    query sees the global batch's documents and mined documents, and the checkpoint holds the bank."""
    import json
    import os
    import subprocess

    out = tmp_path / "run"
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests"), model=str(tiny_text_model_dir), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert result == {"disagree": [], "refreshes": [0, 2], "neg_logits": [2, 4 + 4 * 1 + 4]}
    assert (out / "checkpoint-3" / "mochi_bank_state.pt").is_file()
