"""The code shown to users runs as written: the README's examples and the documentation's guides."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def python_block(page: str, heading: str) -> str:
    """The first ```python block under ``## heading`` of ``page`` (a path from the repository root)."""
    text = (ROOT / page).read_text()
    assert f"## {heading}\n" in text, f"{page} has no section '## {heading}'"
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_mochi_in_one_call_runs():
    scope: dict = {}
    exec(python_block("docs/getting-started.md", "MoCHi in one call"), scope)
    assert scope["out"].synthetic_logits.shape == (256, 768)


@pytest.mark.skipif(not FMNIST.is_file(),
                    reason="needs the dataset-fashion-mnist Debian package (.ci/setup installs it)")
def test_bring_your_own_encoder_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(ROOT / "configs", tmp_path / "configs")
    scope: dict = {}
    try:
        exec(python_block("docs/guides/own-encoder.md", "Bring your own encoder"), scope)
    finally:
        from mochi_retrieval.encoders.registry import _REGISTRY  # leave the registry as found

        _REGISTRY.pop("tiny_cnn", None)
    assert (tmp_path / "runs/tiny_cnn/results.json").is_file()
    assert scope["out"]["loss"].requires_grad


def test_your_own_negative_source_example_runs():
    scope: dict = {}
    exec(python_block("docs/guides/negative-source.md", "Your own negative source"), scope)
    assert scope["out"]["neg_logits"].shape == (4, 64 + 10)


def test_readme_image_example_runs():
    scope: dict = {}
    exec(python_block("README.md", "Images: your own encoder"), scope)
    assert scope["out"]["loss"].requires_grad and scope["out"]["neg_logits"].shape[0] == 32


def test_readme_text_example_names_valid_config_keys(monkeypatch):
    """The text example's command line is a valid config (training it is what test_text_train does)."""
    from mochi_retrieval import train
    from mochi_retrieval.config import load_config

    seen = []

    def check(argv):
        seen.append(load_config(argv[0], argv[1:]))
        return 0

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(train, "main", check)
    exec(python_block("README.md", "Text: your own pairs"), {})
    (cfg,) = seen
    assert cfg.data.dataset == "text_pairs" and cfg.data.limit is None and cfg.bank.enabled


def test_readme_is_short_and_its_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150, "the README is a five-minute read: move details into docs/"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to a missing file: {target}"


def test_readme_keeps_the_ci_command():
    run = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "bash .ci/run" in readme and "bash .ci/setup" in run
