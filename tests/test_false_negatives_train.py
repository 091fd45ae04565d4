"""The false-negative options through the training program on tiny data: each runs and logs its monitors,
and a checkpoint written without one is refused (the resume with one is in test_train.py)."""
import json

import pytest
from test_train import CONFIG, tiny_overrides

from mochi_retrieval import train

FAST = {"eval.linear_probe": "false", "false_negatives.start_epoch": 0, "false_negatives.top_k": 4,
        "mochi.warmup_epochs": 0}


@pytest.mark.parametrize("handling,extra", [
    ("eliminate", {}),  # the config's detector: the key view alone
    ("eliminate", {"false_negatives.support_views": 2, "false_negatives.support_with_key": "false"}),
    ("attract", {"false_negatives.aggregate": "max", "false_negatives.support_views": 1}),
    ("nearest_positive", {"false_negatives.nearest": "join", "mochi.enabled": "false"}),
    ("nearest_positive", {}),
])
def test_each_handling_trains_and_logs_its_monitors(tiny_fmnist_dir, tmp_path, handling, extra):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_fmnist_dir, out, **FAST, **extra, **{
        "false_negatives.handling": handling, "train.max_steps": 3})
    assert train.main([str(CONFIG), *args]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "fn_flagged" in r]
    assert len(logged) == 3
    for r in logged:
        assert r["fn_flagged"] == pytest.approx(1.0 if handling == "nearest_positive" else 4.0)
        assert 0.0 <= r["fn_precision"] <= 1.0 and 0.0 <= r["fn_recall"] <= 1.0 and 0.0 < r["fn_mass"] < 1.0
        assert ("fn_support_s" in r) == (handling != "nearest_positive")
    if extra.get("mochi.enabled") != "false":
        assert any("false_neg_synthetic_sources" in r for r in records), "MoCHi should be on"


def test_a_checkpoint_without_the_option_is_refused_with_it(tiny_fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = {**FAST, "train.max_steps": 2}
    assert train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out, **base)]) == 0
    args = tiny_overrides(tiny_fmnist_dir, out, **{**base, "false_negatives.handling": "eliminate",
                                                    "train.max_steps": 3})
    assert train.main([str(CONFIG), *args]) != 0
    assert "another configuration" in capsys.readouterr().err
