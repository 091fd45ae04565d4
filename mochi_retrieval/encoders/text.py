"""Hugging Face transformers text encoder with mean or CLS pooling.

Loads only from a local folder (``local_files_only=True``), never downloads::

    enc = HFTextEncoder("/path/to/all-MiniLM-L6-v2", pooling="mean")
    emb = enc(enc.tokenize(["a query", "another one"]))   # (2, hidden)

The model's own pooler (BERT's dense+tanh head), if it has one, is unused
here; its parameters are frozen so every trainable parameter gets a gradient
(and DDP needs no ``find_unused_parameters``). It is still saved by ``save``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mochi_retrieval.encoders.registry import register_encoder

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# transformers 5 silently builds an empty-vocabulary tokenizer when these are all absent.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
    "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Attention-masked mean over tokens: hidden (B, L, H), mask (B, L) -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def _load_local(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local folder; ValueError naming what is missing."""
    if not path.is_dir():
        raise ValueError(f"HFTextEncoder: {str(path)!r} is not a directory "
                         "(expected a local transformers model folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"HFTextEncoder: {str(path)!r} is not a transformers model folder: config.json is missing")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"HFTextEncoder: {str(path)!r} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"HFTextEncoder: could not load model weights from {str(path)!r} "
            f"(expected model.safetensors or pytorch_model.bin): {err}"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"HFTextEncoder: could not load a tokenizer from {str(path)!r}: {err}") from err
    if len(tokenizer) <= len(tokenizer.all_special_ids):
        raise ValueError(f"HFTextEncoder: the tokenizer in {str(path)!r} has no vocabulary beyond special tokens")
    return model, tokenizer


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing (transformers 5 name, else the 4.x one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class HFTextEncoder(nn.Module):
    """Text encoder: token batch -> pooled (B, output_dim) embeddings.

    Args:
        model_path: local folder holding a transformers model and tokenizer.
        pooling: "mean" (attention-masked mean of the last hidden states) or
            "cls" (the hidden state of token 0).
        max_length: ``tokenize`` truncates to this many tokens.
        gradient_checkpointing: trade compute for memory in training.

    ``forward(batch)`` takes a Mapping with ``input_ids`` (B, L),
    ``attention_mask`` (B, L) and optionally ``token_type_ids`` (B, L), as
    returned by :meth:`tokenize`; other keys are ignored.
    """

    def __init__(
        self,
        model_path: str | Path,
        pooling: str = "mean",
        max_length: int = 128,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        model, tokenizer = _load_local(Path(model_path))
        self._setup(model, tokenizer, pooling, max_length, gradient_checkpointing)

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pooling: str = "mean",
        max_length: int = 128,
        gradient_checkpointing: bool = False,
    ) -> HFTextEncoder:
        """Wrap an in-memory model and tokenizer (for example a tiny random one)."""
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        encoder._setup(model, tokenizer, pooling, max_length, gradient_checkpointing)
        return encoder

    def _setup(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pooling: str,
        max_length: int,
        gradient_checkpointing: bool,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choices: {', '.join(POOLINGS)}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None)
        if not isinstance(hidden, int):
            raise ValueError(f"cannot read the hidden size from {type(model.config).__name__}")
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
            logger.debug("froze the unused model.pooler of %s", type(model).__name__)
        if gradient_checkpointing:
            _enable_checkpointing(model)
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.output_dim: int = hidden

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Tokenize with padding and truncation to ``max_length``.

        Returns:
            ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the
            tokenizer makes them), each (B, L) with L <= max_length, on CPU.
        """
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v for k, v in enc.items() if isinstance(v, Tensor)}

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Token batch (each (B, L)) -> pooled embeddings (B, output_dim)."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError("HFTextEncoder expects a Mapping with 'input_ids' (and 'attention_mask')")
        inputs: dict[str, Any] = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        hidden = self.model(**inputs).last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, inputs["attention_mask"])

    def save(self, path: str | Path) -> None:
        """Write model and tokenizer to ``path`` with ``save_pretrained``.

        Pooling and max_length are not saved; pass them again when loading.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        logger.info("saved text encoder to %s", path)


register_encoder("hf_text", HFTextEncoder)
