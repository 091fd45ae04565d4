"""Export a trained text encoder as a sentence-transformers model folder.

The folder loads with ``sentence_transformers.SentenceTransformer(path)``
(offline, no download) and with our eval ``--model`` loader
(:func:`mochi_retrieval.eval.models.load_model`), and both give the same
embeddings::

    from mochi_retrieval.export import export_sentence_transformers
    export_sentence_transformers(encoder, "runs/x/model", query_prefix="query: ")

What is written (the classic sentence-transformers layout, which every
version from 2.x to 6.x reads; sentence-transformers itself is not needed
to write it)::

    model/
      modules.json                      Transformer -> Pooling [-> Normalize]
      config.json, model.safetensors    the transformers model (save_pretrained)
      tokenizer.json, tokenizer_config.json, ...
      sentence_bert_config.json         {"max_seq_length": encoder.max_length, ...}
      config_sentence_transformers.json similarity function, prompts (prefixes)
      1_Pooling/config.json             pooling_mode_mean_tokens or _cls_token
      2_Normalize/config.json           only when normalize=True

The folder is built in a temporary sibling of ``path`` and renamed into
place, so a crash leaves either the old folder or the new one, never half.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mochi_retrieval.encoders.text import HFTextEncoder

logger = logging.getLogger(__name__)

_ST_MODULES = {
    "transformer": "sentence_transformers.models.Transformer",
    "pooling": "sentence_transformers.models.Pooling",
    "normalize": "sentence_transformers.models.Normalize",
}
_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _pooling_config(pooling: str, dim: int) -> dict[str, Any]:
    """The 1_Pooling/config.json of sentence-transformers for mean or cls pooling."""
    config: dict[str, Any] = {"word_embedding_dimension": dim}
    for key in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                "pooling_mode_lasttoken"):
        config[key] = key == _POOLING_KEYS[pooling]
    config["include_prompt"] = True
    return config


def _st_config(normalize: bool, query_prefix: str | None, document_prefix: str | None) -> dict[str, Any]:
    """config_sentence_transformers.json: versions, prompts and similarity function."""
    import torch
    import transformers

    from mochi_retrieval import __version__

    prompts = {name: text for name, text in (("query", query_prefix), ("document", document_prefix))
               if text is not None}
    return {
        "__version__": {"mochi_retrieval": __version__, "transformers": transformers.__version__,
                        "pytorch": torch.__version__},
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot",
    }


def _write_folder(encoder: HFTextEncoder, out: Path, normalize: bool,
                  query_prefix: str | None, document_prefix: str | None) -> None:
    """Write every file of the export into the (empty) folder ``out``."""
    if encoder.pooling not in _POOLING_KEYS:
        raise ValueError(f"cannot export pooling {encoder.pooling!r}; choices: {', '.join(_POOLING_KEYS)}")
    encoder.model.save_pretrained(out)
    encoder.tokenizer.save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": _ST_MODULES["transformer"]},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_MODULES["pooling"]},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_MODULES["normalize"]})
        _write_json(out / "2_Normalize" / "config.json", {})  # an empty folder would not survive git
    _write_json(out / "modules.json", modules)
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": encoder.max_length, "do_lower_case": False})
    _write_json(out / "1_Pooling" / "config.json", _pooling_config(encoder.pooling, encoder.output_dim))
    _write_json(out / "config_sentence_transformers.json", _st_config(normalize, query_prefix, document_prefix))


def _check_limits(encoder: HFTextEncoder) -> None:
    """Warn when max_length exceeds what the model or tokenizer can take."""
    limits = {"max_position_embeddings": getattr(encoder.model.config, "max_position_embeddings", None),
              "tokenizer.model_max_length": getattr(encoder.tokenizer, "model_max_length", None)}
    for name, limit in limits.items():
        if isinstance(limit, int) and limit < encoder.max_length:
            logger.warning("export: encoder max_length %d exceeds %s %d; sentence-transformers may truncate "
                           "differently from our loader", encoder.max_length, name, limit)


def export_sentence_transformers(
    encoder: HFTextEncoder,
    path: str | Path,
    *,
    normalize: bool = True,
    query_prefix: str | None = None,
    document_prefix: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``encoder`` as a sentence-transformers model folder at ``path``.

    Args:
        encoder: the text encoder (its ``model``, ``tokenizer``, ``pooling``
            and ``max_length`` are exported; the weights as they are now, so
            pass the query encoder of a MoCo model).
        path: the folder to create. Its parent is created if needed.
        normalize: add a Normalize module, so sentence-transformers returns
            unit-norm (B, D) embeddings, as our evaluators do; similarity
            function "cosine" (else "dot").
        query_prefix, document_prefix: saved as the prompts "query" and
            "document" (``model.encode(texts, prompt_name="query")``); neither
            is applied by default.
        overwrite: replace an existing non-empty ``path``; without it that
            raises ``FileExistsError``.
    Returns:
        The folder, as a ``Path``.
    Raises:
        FileExistsError: ``path`` exists, is not empty, and ``overwrite`` is False.
        NotADirectoryError: ``path`` exists and is a file.
        ValueError: the encoder's pooling is neither mean nor cls.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"export: {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"export: {target} exists and is not empty; pass overwrite=True to replace it")
    _check_limits(encoder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_folder(encoder, tmp, normalize, query_prefix, document_prefix)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported sentence-transformers model to %s (pooling %s, max_seq_length %d, normalize %s)",
                target, encoder.pooling, encoder.max_length, normalize)
    return target


def _replace_dir(src: Path, target: Path) -> None:
    """Move the finished folder ``src`` to ``target``, replacing what is there."""
    if not target.exists():
        src.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        src.rename(target)
    except BaseException:
        old.rename(target)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_model_card(
    path: str | Path,
    metrics: dict[str, float] | None = None,
    *,
    config_name: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write ``path/README.md``: a short model card with the run's config and metrics.

    Args:
        path: an exported model folder (it must exist).
        metrics: metric name -> value (for example ``{"R@1": 0.75}``), shown as a table.
        config_name: the training config (for example ``debian_minilm``).
        base_model: the model that was fine-tuned.
    Returns:
        The README path.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise NotADirectoryError(f"write_model_card: {folder} is not a directory")
    lines = ["---", "library_name: sentence-transformers", "tags:", "- sentence-transformers",
             "- mochi-retrieval", "pipeline_tag: sentence-similarity", "---", "",
             "# Text embedding model trained with mochi_retrieval", ""]
    if config_name:
        lines.append(f"- Training config: `{config_name}`")
    if base_model:
        lines.append(f"- Base model: `{base_model}`")
    lines += ["", "```python", "from sentence_transformers import SentenceTransformer",
              f"model = SentenceTransformer({str(folder)!r})", "```", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
                  for name, value in metrics.items()]
        lines.append("")
    readme = folder / "README.md"
    tmp = readme.with_name(".README.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(readme)
    return readme
