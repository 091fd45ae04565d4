"""The README's code runs as written."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def python_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_mochi_in_one_call_runs():
    scope: dict = {}
    exec(python_block("MoCHi in one call"), scope)
    assert scope["out"].synthetic_logits.shape == (256, 768)


@pytest.mark.skipif(not FMNIST.is_file(),
                    reason="needs the dataset-fashion-mnist Debian package (.ci/setup installs it)")
def test_bring_your_own_encoder_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(ROOT / "configs", tmp_path / "configs")
    scope: dict = {}
    try:
        exec(python_block("Bring your own encoder"), scope)
    finally:
        from mochi_retrieval.encoders.registry import _REGISTRY  # leave the registry as found

        _REGISTRY.pop("tiny_cnn", None)
    assert (tmp_path / "runs/tiny_cnn/results.json").is_file()
    assert scope["out"]["loss"].requires_grad


def test_your_own_negative_source_example_runs():
    scope: dict = {}
    exec(python_block("Your own negative source"), scope)
    assert scope["out"]["neg_logits"].shape == (4, 64 + 10)
