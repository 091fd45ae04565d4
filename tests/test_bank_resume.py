"""A resumed run neither loses nor redoes its bank: the bank is in the checkpoint, and the resumed trajectory
equals the uninterrupted one (text: initial pass, full and rolling refreshes on schedule; images: the keys
written to the bank)."""
import json

import torch
from test_text_train import CONFIG as TEXT_CONFIG
from test_text_train import text_overrides
from test_train import CONFIG as IMAGE_CONFIG
from test_train import losses, tiny_overrides

from mochi_retrieval import train


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _bank(out):
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    return state["bank.embeddings"], state["bank.stamps"]


def test_text_run_resumed_mid_way_matches_the_uninterrupted_run(tiny_text_model_dir, tmp_path):
    from test_text_train import make_tiny_beir

    beir = make_tiny_beir(tmp_path / "beir")
    extra = {"bank.refresh_every": 3, "bank.max_staleness": 2, "bank.mined_negatives": 1, "train.max_steps": 5,
             "moco.queue_size": 0, "mochi.enabled": "false", "train.checkpoint_every_steps": 1}
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main([str(TEXT_CONFIG), *text_overrides(tiny_text_model_dir, beir, full, **extra)]) == 0
    assert train.main([str(TEXT_CONFIG), *text_overrides(tiny_text_model_dir, beir, cut,
                                                          **{**extra, "train.max_steps": 2})]) == 0
    assert train.main([str(TEXT_CONFIG), *text_overrides(tiny_text_model_dir, beir, cut, **extra)]) == 0
    a, b = _records(full), _records(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert rb["loss"] == ra["loss"] and rb.get("bank_staleness_max") == ra.get("bank_staleness_max"), ra["step"]
    (ea, sa), (eb, sb) = _bank(full), _bank(cut)
    assert torch.equal(ea, eb) and torch.equal(sa, sb)
    # The resumed run did one full refresh (step 3), not a new initial pass at step 2.
    rb = json.loads((cut / "results.json").read_text())
    ra = json.loads((full / "results.json").read_text())
    assert ra["bank_refreshes"] == 2 and rb["bank_refreshes"] == 1


def test_image_run_resumed_keeps_the_keys_written_to_its_bank(tiny_fmnist_dir, tmp_path):
    common = {"eval.linear_probe": "false", "train.epochs": 2, "bank.enabled": "true", "bank.candidates": 8}
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main([str(IMAGE_CONFIG), *tiny_overrides(tiny_fmnist_dir, full, **common)]) == 0
    stopped = tiny_overrides(tiny_fmnist_dir, cut, **common, **{"train.max_steps": 4})
    assert train.main([str(IMAGE_CONFIG), *stopped]) == 0
    assert train.main([str(IMAGE_CONFIG), *tiny_overrides(tiny_fmnist_dir, cut, **common)]) == 0
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b)
    for step in a:
        assert abs(b[step] - a[step]) <= 1e-5 * abs(a[step]) + 1e-6, step
    (ea, _), (eb, _) = _bank(full), _bank(cut)
    torch.testing.assert_close(ea, eb, rtol=1e-4, atol=1e-5)
