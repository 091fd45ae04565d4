"""Turn a ``--model PATH`` into an encoder the evaluators can call.

Three kinds of path are understood, tried in this order:

(a) a Hugging Face / sentence-transformers model folder (``config.json`` plus
    weights and tokenizer), or a folder whose ``model/`` subfolder is one: a
    text encoder with the pooling named in sentence-transformers'
    ``1_Pooling/config.json`` (mean when that file is absent), L2-normalised
    outputs, ``max_length`` from ``sentence_bert_config.json`` when present;
(b) a run folder of our trainer holding ``config.yaml`` (the resolved
    :class:`mochi_retrieval.config.ExperimentConfig`) and ``encoder.pt``
    (``{"encoder": state_dict}`` of the query encoder, no projection head), or
    the ``encoder.pt`` file itself: the encoder is rebuilt with
    ``create_encoder(cfg.model.encoder, **cfg.model.encoder_kwargs)``;
(c) anything else: :class:`EvalInputError` "model path X loads nothing".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mochi_retrieval.eval.errors import EvalInputError
from mochi_retrieval.search import l2_normalize

logger = logging.getLogger(__name__)

_EXPECTED = (
    "expected a Hugging Face / sentence-transformers model folder (config.json, weights, tokenizer), "
    "a folder with such a model/ subfolder, or a run folder of our trainer (config.yaml and encoder.pt)"
)
_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclass
class LoadedModel:
    """An encoder ready for evaluation.

    Attributes:
        encoder: the ``nn.Module`` (eval mode, on ``device``).
        modality: "text" (the encoder has ``tokenize``) or "image".
        source: "huggingface" or "run".
        config: the run's ExperimentConfig for kind (b), else None.
        device: where forward passes run.
    """

    encoder: nn.Module
    modality: str
    source: str
    config: Any
    device: torch.device

    def encode_texts(self, texts: list[str]) -> Tensor:
        """Texts -> (n, D) unit-norm float32 embeddings on the CPU."""
        if self.modality != "text":
            raise EvalInputError(f"this {self.source} model encodes images, not text")
        batch = {k: v.to(self.device) for k, v in self.encoder.tokenize(texts).items()}
        with torch.inference_mode():
            return l2_normalize(self.encoder(batch)).cpu()

    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) float -> (B, D) float32 features on the CPU (not normalised)."""
        if self.modality != "image":
            raise EvalInputError(f"this {self.source} model encodes text, not images")
        with torch.inference_mode():
            return self.encoder(images.to(self.device)).float().cpu()


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def _st_settings(path: Path) -> tuple[str, int | None]:
    """Pooling and max length from sentence-transformers side files, if any."""
    pooling, max_length = "mean", None
    pool_cfg = path / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        modes = json.loads(pool_cfg.read_text())
        if isinstance(modes.get("pooling_mode"), str):  # sentence-transformers >= 6: {"pooling_mode": "mean"}
            name = {"mean": "mean", "cls": "cls"}.get(modes["pooling_mode"])
            if name is None:
                raise EvalInputError(f"{pool_cfg}: unsupported pooling {modes['pooling_mode']!r}; "
                                     "only mean or cls pooling")
            modes = {key: value == name for key, value in _ST_POOLING.items()}
        chosen = [name for key, name in _ST_POOLING.items() if modes.get(key)]
        others = [k for k, v in modes.items() if k.startswith("pooling_mode") and v and k not in _ST_POOLING]
        if others or len(chosen) != 1:
            raise EvalInputError(f"{pool_cfg}: unsupported pooling {others or chosen}; only mean or cls pooling")
        pooling = chosen[0]
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        max_length = json.loads(sbert.read_text()).get("max_seq_length")
    return pooling, max_length


def _load_hf(path: Path, device: torch.device, max_length: int | None) -> LoadedModel:
    from mochi_retrieval.encoders import HFTextEncoder

    pooling, st_max = _st_settings(path)
    try:
        encoder = HFTextEncoder(path, pooling=pooling, max_length=max_length or st_max or 512)
    except ValueError as e:
        raise EvalInputError(f"model path {path} loads nothing: {e}") from None
    if not (max_length or st_max):  # nothing saved: the model's own limits, at most 512
        limits = [512, getattr(encoder.tokenizer, "model_max_length", 512),
                  getattr(encoder.model.config, "max_position_embeddings", 512)]
        encoder.max_length = min(int(x) for x in limits)
    length = encoder.max_length
    logger.info("loaded Hugging Face model %s (pooling %s, max_length %d)", path, pooling, length)
    return LoadedModel(encoder.to(device).eval(), "text", "huggingface", None, device)


def _load_run(folder: Path, weights: Path, device: torch.device) -> LoadedModel:
    from mochi_retrieval.config import ConfigError, load_config
    from mochi_retrieval.encoders import create_encoder

    if not weights.is_file():
        raise EvalInputError(f"run folder {folder} has config.yaml but no {weights.name} (is training finished?)")
    try:
        cfg = load_config(folder / "config.yaml")
    except ConfigError as e:
        raise EvalInputError(f"model path {folder}: bad config.yaml: {e}") from None
    encoder = create_encoder(cfg.model.encoder, **cfg.model.encoder_kwargs)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise EvalInputError(f"cannot read {weights}: {e}") from None
    if not isinstance(state, dict) or "encoder" not in state:
        raise EvalInputError(f"{weights} is not an encoder checkpoint: expected a dict with an 'encoder' state_dict")
    try:
        encoder.load_state_dict(state["encoder"])
    except RuntimeError as e:
        raise EvalInputError(f"{weights} does not fit encoder {cfg.model.encoder!r}: {e}") from None
    modality = "text" if hasattr(encoder, "tokenize") else "image"
    logger.info("loaded run %s: %s encoder %r", folder, modality, cfg.model.encoder)
    return LoadedModel(encoder.to(device).eval(), modality, "run", cfg, device)


def load_model(path: str | Path, device: str | torch.device = "cpu", max_length: int | None = None) -> LoadedModel:
    """Load ``path`` as described in the module docstring.

    Args:
        path: model folder, run folder, or a run's ``encoder.pt``.
        device: where the encoder runs.
        max_length: text models only; overrides the saved maximum token count.
    Raises:
        EvalInputError: the path loads nothing, or what it holds is broken.
    """
    path, device = Path(path), torch.device(device)
    if path.is_file() and path.suffix == ".pt" and (path.parent / "config.yaml").is_file():
        return _load_run(path.parent, path, device)
    if _is_hf_folder(path):
        return _load_hf(path, device, max_length)
    if path.is_dir() and (path / "config.yaml").is_file():
        if _is_hf_folder(path / "model"):
            return _load_hf(path / "model", device, max_length)
        return _load_run(path, path / "encoder.pt", device)
    if path.is_dir() and _is_hf_folder(path / "model"):
        return _load_hf(path / "model", device, max_length)
    reason = "it does not exist" if not path.exists() else "nothing recognised in it"
    raise EvalInputError(f"model path {path} loads nothing ({reason}): {_EXPECTED}")
