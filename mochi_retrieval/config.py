"""Strict, typed experiment configuration (read only at the edge).

The training program turns a YAML file plus ``dotted.key=value`` overrides into
an :class:`ExperimentConfig` and hands plain values to the library's
constructors; the library itself never reads YAML.

Usage::

    cfg = load_config("configs/fmnist.yaml", ["train.lr=0.06", "mochi.enabled=false"])
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

Rules (nanoGPT-style strictness):

- unknown keys are errors naming the dotted key, with the nearest valid key;
- types are checked: ``int`` (not bool, not float), ``float`` (an int is
  accepted), ``bool`` (only real booleans), ``str``, ``Optional[X]``,
  ``Literal[...]``, ``list[X]``, ``tuple[X, ...]``, nested dataclasses and
  ``dict[str, Any]`` (free-form, e.g. encoder keyword arguments);
- value ranges are checked in each schema class's ``__post_init__``.

YAML is read with a subclass of ``yaml.SafeLoader`` (safe constructors only)
that follows YAML 1.2 for two scalars: ``1e-4`` is a float (PyYAML reads it as
a string) and only ``true``/``false`` are booleans, so ``mixed_precision: no``
is the string ``"no"``, not ``False``.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import os
import re
import types
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_NoneType = type(None)


class ConfigError(ValueError):
    """A configuration is invalid; the message names the dotted key at fault."""


class ConfigValueError(ConfigError):
    """A value is out of range. ``key`` is dotted relative to the class that raised it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid value for '{key}': {reason}")
        self.key, self.reason = key, reason


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise :class:`ConfigValueError` ``'key': must be <rule>, got <value>`` unless ``ok``."""
    if not ok:
        raise ConfigValueError(key, f"must be {rule}, got {value!r}")


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (true/false only) and floats such as ``1e-4``."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings :class:`_Loader` would read as non-strings."""


_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    ch: [r for r in rs if r[0] not in (_BOOL_TAG, _FLOAT_TAG)]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))
_Dumper.yaml_implicit_resolvers = {ch: list(rs) for ch, rs in yaml.SafeDumper.yaml_implicit_resolvers.items()}
_Dumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    """Parse YAML text with safe constructors only."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader subclasses SafeLoader


# --------------------------------------------------------------------------- typing helpers


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """``{name: (resolved type, Field)}`` for the init fields of dataclass ``cls``."""
    hints = get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Human-readable name of a supported type annotation."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return "any value"
    if _is_union(tp):
        return " or ".join("None" if a is _NoneType else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__} section)"
    return getattr(tp, "__name__", repr(tp))


def _suggest(key: str, path: str, valid: Sequence[str], root: Optional[type] = None) -> str:
    """Error text for unknown ``key`` under ``path``, with the nearest valid key."""
    full = _join(path, key)
    close = difflib.get_close_matches(key, list(valid), n=1)
    if close:
        return f"unknown key '{full}' (did you mean '{_join(path, close[0])}'?)"
    elsewhere = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1] == key] if root else []
    if elsewhere:
        return f"unknown key '{full}' (did you mean {' or '.join(repr(k) for k in elsewhere)}?)"
    return f"unknown key '{full}' (valid keys: {', '.join(valid)})"


def _all_keys(cls: type, path: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls``, nested sections included."""
    out = []
    for name, (tp, _) in _fields(cls).items():
        out.append(_join(path, name))
        if dataclasses.is_dataclass(tp):
            out += _all_keys(tp, _join(path, name))
    return out


# --------------------------------------------------------------------------- from_dict / to_dict


def _wrong(path: str, tp: Any, value: Any) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ConfigError(f"wrong type for '{path}': expected {_type_name(tp)}, got {type(value).__name__} {shown}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted (int->float, list->tuple)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty section in YAML ("model:" with everything commented out)
            value = {}
        if not isinstance(value, Mapping):
            raise _wrong(path, tp, value)
        return from_dict(tp, value, path)
    if _is_union(tp):
        if value is None and _NoneType in args:
            return None
        arms = [a for a in args if a is not _NoneType]
        for arm in arms:
            try:
                return _convert(arm, value, path)
            except ConfigError:
                if len(arms) == 1 and isinstance(value, (Mapping, list, tuple)):
                    raise  # the inner error names the nested key at fault
        raise _wrong(path, tp, value)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [c for c in args if isinstance(c, str)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"invalid value for '{path}': expected {_type_name(tp)}, got {value!r}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong(path, tp, value)
        if origin is list:
            return [_convert(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"wrong length for '{path}': expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        key_tp, val_tp = args if args else (Any, Any)
        if not isinstance(value, Mapping):
            raise _wrong(path, tp, value)
        return {
            _convert(key_tp, k, f"{path} key {k!r}"): _convert(val_tp, v, _join(path, str(k)))
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r} at '{path}'")
    raise _wrong(path, tp, value)


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking keys, types and ranges.

    Args:
        cls: a dataclass whose fields use the supported types (module docstring).
        data: plain values, as read from YAML.
        path: dotted prefix of ``data`` inside the whole config, used in messages.

    Raises:
        ConfigError: unknown or missing key, wrong type, or out-of-range value;
            the message names the full dotted key.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise _wrong(path or "<config>", cls, data)
    schema = _fields(cls)
    for key in data:
        if key not in schema:
            raise ConfigError(_suggest(str(key), path, list(schema), None if path else cls))
    kwargs = {}
    for name, (tp, f) in schema.items():
        if name in data:
            kwargs[name] = _convert(tp, data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        if not path:
            raise
        raise ConfigValueError(_join(path, e.key), e.reason) from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists), in field order."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# --------------------------------------------------------------------------- files and overrides


def _apply_override(data: dict[str, Any], item: str, cls: type) -> None:
    """Set ``a.b.c=value`` in ``data`` in place, checking each key against schema ``cls``."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"malformed override {item!r}: expected dotted.key=value")
    try:
        value = _yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value of override {item!r}: {e}") from None
    tp: Any = cls
    node = data
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        while _is_union(tp):  # Optional[Section]: walk into the section
            tp = next(a for a in get_args(tp) if a is not _NoneType)
        if dataclasses.is_dataclass(tp):
            schema = _fields(tp)
            if part not in schema:
                raise ConfigError(f"{_suggest(part, path, list(schema), cls if i == 0 else None)} in override {item!r}")
            tp = schema[part][0]
        elif not (tp is dict or get_origin(tp) is dict):
            raise ConfigError(f"cannot set {key!r}: '{path}' is a value, not a section (override {item!r})")
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {key!r}: '{_join(path, part)}' is not a mapping (override {item!r})")
            node = child


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), cls: type[T] | None = None) -> T:
    """Read a YAML config, apply ``dotted.key=value`` overrides and build ``cls``.

    Args:
        path: YAML file; an empty file means all defaults.
        overrides: strings such as ``"train.lr=0.1"``, ``"model.encoder_kwargs.width=2"``;
            values are YAML (``0.1``, ``true``, ``[1, 2]``, ``null``).
        cls: the schema, :class:`ExperimentConfig` by default.

    Raises:
        ConfigError: missing file, YAML syntax error (with line), bad override, or
            any error from :func:`from_dict`.
    """
    cls = ExperimentConfig if cls is None else cls
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: '{os.fspath(path)}'") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{os.fspath(path)}': {e}") from None
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"YAML syntax error in '{os.fspath(path)}'{where}: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"'{os.fspath(path)}': the top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item, cls)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as complete YAML, atomically (temp file in the same folder, then rename)."""
    from .files import atomic_write

    text = yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """Encoder and projection head."""

    encoder: str = "resnet18"
    """Registry name of the encoder."""
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    """Free-form keyword arguments passed to the encoder factory."""
    head_hidden_dim: int = 2048
    """Hidden width of the MLP projection head."""
    head_out_dim: int = 128
    """Output (embedding) dimension of the projection head."""
    head_layers: int = 2
    """Number of linear layers in the projection head (1 = a single linear map)."""
    key_encoder: Literal["momentum", "shared"] = "momentum"
    """Key encoder: a momentum (EMA) copy of the query encoder, or the same weights."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm in distributed runs."""
    shuffle_bn: bool = True
    """Shuffle the key batch across ranks so BatchNorm cannot leak the positive."""
    grad_cache_chunk: Optional[int] = None
    """Text: encode a step's texts in chunks of this many with GradCache (same gradient, memory of one
    chunk, one extra forward pass); null = one pass. One process only."""

    def __post_init__(self) -> None:
        _require(bool(self.encoder), "encoder", "a non-empty name", self.encoder)
        _require(self.grad_cache_chunk is None or self.grad_cache_chunk >= 1, "grad_cache_chunk", ">= 1 or null",
                 self.grad_cache_chunk)
        _require(self.head_hidden_dim > 0, "head_hidden_dim", "> 0", self.head_hidden_dim)
        _require(self.head_out_dim > 0, "head_out_dim", "> 0", self.head_out_dim)
        _require(self.head_layers >= 1, "head_layers", ">= 1", self.head_layers)


TEXT_DATASETS = ("text_pairs", "debian")


@dataclass
class DataConfig:
    """Training data and augmentation."""

    dataset: Literal["fashion_mnist", "imagefolder", "text_pairs", "debian"] = "fashion_mnist"
    """Which dataset loader to use. Text: "text_pairs" (a BEIR folder, or a .jsonl/.csv/.parquet
    pairs file, at ``root``) or "debian" (the Debian descriptions BEIR folder at ``root``, built
    from apt's translation files on first use)."""
    root: str = "/usr/share/datasets/fashion-mnist"
    """Folder holding the data."""
    class_list: Optional[str] = None
    """File of class folder names, one a line (e.g. the ImageNet-100 subset); None = all."""
    image_size: int = 32
    """Side of the square crops fed to the encoder, in pixels."""
    augmentation: Literal["mocov2", "mocov2_small_grey"] = "mocov2_small_grey"
    """Augmentation recipe: MoCo-v2 aug+, or its variant for small grey images."""
    num_workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    skip_corrupt_images: bool = False
    """Image folders: replace an image file that cannot be decoded by the next one (logged and counted)
    instead of stopping with an error that names it."""
    limit: Optional[int] = None
    """Use only N training items (images: the first N; text: N pairs drawn with the seed); None = all."""
    split: str = "train"
    """Text, BEIR folders: the qrels split to train on."""
    query_prefix: str = ""
    """Text: prepended to every query (asymmetric models, e.g. "query: ")."""
    document_prefix: str = ""
    """Text: prepended to every document (e.g. "passage: ")."""
    query_column: str = "query"
    """Text pairs files: the query column."""
    positive_column: str = "positive"
    """Text pairs files: the positive document column."""
    negative_column: str = "negative"
    """Text pairs files: hard negatives, one column (text or list) or NAME_1..NAME_n."""

    @property
    def is_text(self) -> bool:
        return self.dataset in TEXT_DATASETS

    def __post_init__(self) -> None:
        _require(bool(self.split), "split", "a non-empty split name", self.split)
        _require(self.image_size > 0, "image_size", "> 0", self.image_size)
        _require(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        _require(self.limit is None or self.limit > 0, "limit", "> 0 or null", self.limit)


@dataclass
class MoCoConfig:
    """MoCo momentum queue and InfoNCE loss."""

    queue_size: int = 65536
    """Number of keys K in the negative queue."""
    momentum: float = 0.999
    """EMA momentum m of the key encoder (final value under the cosine schedule)."""
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    """Keep m fixed, or raise it from ``momentum`` towards 1 on a cosine."""
    temperature: float = 0.2
    """Softmax temperature T of the InfoNCE logits."""
    mask_same_label: bool = False
    """Mask queue entries that share the query's label (false negatives), when labels exist."""
    in_batch_negatives: bool = True
    """Text: the batch's other documents are negatives too (with gradient in the shared mode)."""
    max_neg_pos_ratio: Optional[float] = None
    """Text: mask negatives (any source) with q.n above this share of q.k (near-duplicate false negatives)."""
    gradient: Literal["query_only", "joint"] = "query_only"
    """Text, shared encoder: detached negatives (queue, bank vectors, MoCHi) score the query only and the
    documents get the in-batch (and mined) term's gradient ("query_only"), or one softmax over all ("joint")."""

    def __post_init__(self) -> None:
        _require(self.max_neg_pos_ratio is None or self.max_neg_pos_ratio > 0, "max_neg_pos_ratio", "> 0 or null",
                 self.max_neg_pos_ratio)
        _require(self.queue_size >= 0, "queue_size", ">= 0 (0 = no queue, text runs only)", self.queue_size)
        _require(0.0 <= self.momentum <= 1.0, "momentum", "in [0, 1]", self.momentum)
        _require(self.temperature > 0, "temperature", "> 0", self.temperature)


@dataclass
class MoCHiSettings:
    """MoCHi hard negative mixing, MoCHi(N, s, s')."""

    enabled: bool = True
    """Append synthetic hard negatives to the logits."""
    n_hard: int = 1024
    """N: size of each query's hard pool (its top-N queue entries)."""
    n_mix: int = 512
    """s: synthetic negatives mixing two pool members."""
    n_query_mix: int = 256
    """s': synthetic negatives mixing the (detached) query with a pool member."""
    beta_max: float = 0.5
    """Upper bound of the query weight b ~ U(0, beta_max) in query mixes."""
    warmup_epochs: float = 15.0
    """Epochs of plain MoCo before mixing starts (an early queue is near random)."""
    cap_at_positive: bool = False
    """Drop synthetic points scoring above the query's positive (q.h > q.k); for text temperatures."""

    def __post_init__(self) -> None:
        for key in ("n_hard", "n_mix", "n_query_mix"):
            _require(getattr(self, key) >= 0, key, ">= 0", getattr(self, key))
        _require(0.0 < self.beta_max < 1.0, "beta_max", "in (0, 1)", self.beta_max)
        _require(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)


@dataclass
class BankConfig:
    """FAISS hard-negative bank over the training documents (ANCE-style refreshes)."""

    enabled: bool = False
    """Add the bank's candidates to each query's negatives (and MoCHi's hard pool)."""
    candidates: int = 16
    """c: detached candidate negatives per query (stored vectors; top-c by similarity after exclusions)."""
    mined_negatives: int = 0
    """Text: n negatives per query mined from the bank and re-encoded with gradient (taken before the c)."""
    exclude_family: bool = False
    """Text: the bank also excludes a positive's family (documents sharing its first paragraph)."""
    max_pos_ratio: Optional[float] = None
    """Text: skip candidates with q.d above this share of q.k (sentence-transformers' relative_margin = 1 - r)."""
    refresh_every: int = 0
    """Re-embed the whole bank every R steps; 0 = only at the start (in-place updates keep it fresh)."""
    update_with_keys: bool = True
    """Write each batch's document keys into the bank (in place)."""
    skip_top: int = 0
    """Rank window: skip each query's first r candidates (likely false negatives)."""
    max_similarity: Optional[float] = None
    """Similarity ceiling: drop candidates with q.d above it; None = no ceiling."""
    backend: Literal["faiss", "torch"] = "faiss"
    """FAISS flat inner-product index, or exact torch search (same candidates)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the index lives: GPU when available ("auto"); "cuda" without a GPU warns and uses the CPU."""
    encode_batch_size: int = 128
    """Documents per forward pass when the bank is re-embedded."""

    def __post_init__(self) -> None:
        _require(self.candidates >= 0, "candidates", ">= 0", self.candidates)
        _require(self.mined_negatives >= 0, "mined_negatives", ">= 0", self.mined_negatives)
        _require(self.max_pos_ratio is None or self.max_pos_ratio > 0, "max_pos_ratio", "> 0 or null",
                 self.max_pos_ratio)
        _require(self.candidates + self.mined_negatives >= 1, "candidates",
                 ">= 1 unless mined_negatives > 0", self.candidates)
        _require(self.refresh_every >= 0, "refresh_every", ">= 0", self.refresh_every)
        _require(self.skip_top >= 0, "skip_top", ">= 0", self.skip_top)
        _require(self.encode_batch_size >= 1, "encode_batch_size", ">= 1", self.encode_batch_size)
        _require(self.max_similarity is None or -1.0 <= self.max_similarity <= 1.0, "max_similarity",
                 "in [-1, 1] or null", self.max_similarity)


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpoints."""

    epochs: int = 200
    """Number of passes over the training data."""
    max_steps: Optional[int] = None
    """Stop after this many optimiser steps (overrides ``epochs`` when smaller); None = no cap."""
    batch_size: int = 256
    """Global batch size (summed over processes)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """Optimiser."""
    lr: float = 0.03
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    weight_decay: float = 1e-4
    """Weight decay."""
    warmup_epochs: float = 0.0
    """Linear learning-rate warm-up, in epochs."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: Optional[float] = None
    """Clip the gradient norm to this before each optimiser step; None = no clipping (1.0 is usual for text)."""
    weight_decay_1d: bool = True
    """Weight decay on 1-D parameters (biases, norm scales) too, as MoCo does; false as in BERT fine-tuning."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Mixed precision mode, as accelerate names it."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    log_every: int = 50
    """Log training numbers every this many steps."""
    diagnostics_every: int = 200
    """Compute the costlier diagnostics (e.g. negative hardness) every this many steps."""
    checkpoint_every_epochs: int = 1
    """Write a checkpoint every this many epochs."""
    checkpoint_every_steps: Optional[int] = None
    """Also write a checkpoint every this many optimiser steps; None = only per epoch (and at the end)."""
    checkpoint_every_minutes: Optional[float] = None
    """Also write a checkpoint when this many minutes have passed since the last one; None = off."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (``checkpoints/step-N.pt``); ``checkpoints/last.pt`` links the newest."""
    resume: bool = True
    """Resume from the latest checkpoint in ``output_dir`` when there is one."""
    dist_timeout_minutes: float = 30.0
    """Several processes: give up on a collective after this long (a process died or hangs) and stop with a
    message. It must exceed what the main process does alone, such as the kNN monitor and checkpoint writes."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum_steps", "log_every", "diagnostics_every",
                    "checkpoint_every_epochs", "keep_checkpoints"):
            _require(getattr(self, key) >= 1, key, ">= 1", getattr(self, key))
        _require(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1, "checkpoint_every_steps",
                 ">= 1 or null", self.checkpoint_every_steps)
        _require(self.checkpoint_every_minutes is None or self.checkpoint_every_minutes > 0,
                 "checkpoint_every_minutes", "> 0 or null", self.checkpoint_every_minutes)
        _require(self.dist_timeout_minutes > 0, "dist_timeout_minutes", "> 0", self.dist_timeout_minutes)
        _require(self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1 or null", self.max_steps)
        _require(self.lr > 0, "lr", "> 0", self.lr)
        _require(0.0 <= self.momentum <= 1.0, "momentum", "in [0, 1]", self.momentum)
        _require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 or null",
                 self.max_grad_norm)
        _require(self.warmup_epochs >= 0, "warmup_epochs", ">= 0", self.warmup_epochs)


@dataclass
class EvalConfig:
    """Evaluation during and after training."""

    knn_k: int = 200
    """Neighbours voting in the kNN classifier."""
    knn_temperature: float = 0.1
    """Temperature of the kNN similarity weights exp(s / t)."""
    knn_every_epochs: int = 1
    """Run the kNN evaluation every this many epochs."""
    knn_train_limit: Optional[int] = None
    """Use only the first N training items as the kNN memory bank; None = all."""
    linear_probe: bool = True
    """Train a linear probe on frozen features after training."""
    limit: Optional[int] = None
    """Final evaluation on the first N train and N test items only (quick runs); None = all.
    Text: the first N queries of the split."""
    split: str = "test"
    """Text: the BEIR split evaluated after training."""
    corpus: Literal["split", "all"] = "split"
    """Text: search the documents judged in that split only, or the whole corpus."""
    recall_ks: tuple[int, ...] = (1, 10, 100)
    """Text: cut-offs of recall@k (MRR@10 and nDCG@10 are always reported)."""
    batch_size: int = 64
    """Text: texts per forward pass when encoding for evaluation."""

    def __post_init__(self) -> None:
        _require(bool(self.split), "split", "a non-empty split name", self.split)
        _require(len(self.recall_ks) > 0 and min(self.recall_ks) >= 1, "recall_ks", "cut-offs >= 1", self.recall_ks)
        _require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _require(self.limit is None or self.limit >= 1, "limit", ">= 1 or null", self.limit)
        _require(self.knn_k >= 1, "knn_k", ">= 1", self.knn_k)
        _require(self.knn_temperature > 0, "knn_temperature", "> 0", self.knn_temperature)
        _require(self.knn_every_epochs >= 1, "knn_every_epochs", ">= 1", self.knn_every_epochs)
        _require(self.knn_train_limit is None or self.knn_train_limit >= 1, "knn_train_limit", ">= 1 or null",
                 self.knn_train_limit)


@dataclass
class ExperimentConfig:
    """A whole training run: the file ``python -m mochi_retrieval.train CONFIG.yaml`` reads."""

    name: str = "experiment"
    """Run name, used in logs."""
    output_dir: str = "runs/experiment"
    """Folder for checkpoints, logs and the resolved config."""
    seed: int = 0
    """Random seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder and projection head."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and augmentation."""
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    """MoCo queue, momentum and temperature."""
    mochi: MoCHiSettings = field(default_factory=MoCHiSettings)
    """MoCHi hard negative mixing."""
    bank: BankConfig = field(default_factory=BankConfig)
    """FAISS hard-negative bank."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and bookkeeping."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "name", "a non-empty string", self.name)
        _require(bool(self.output_dir), "output_dir", "a non-empty path", self.output_dir)
        if not self.data.is_text:
            _require(self.moco.queue_size > 0, "moco.queue_size", "> 0 for image runs", self.moco.queue_size)
            _require(not self.bank.enabled or self.bank.refresh_every == 0, "bank.refresh_every",
                     "0 for image runs (an image bank is kept fresh by each batch's keys)", self.bank.refresh_every)
            _require(not self.bank.enabled or self.bank.update_with_keys, "bank.update_with_keys",
                     "true for image runs (the keys are what fills an image bank)", self.bank.update_with_keys)
            _require(not self.bank.enabled or self.bank.mined_negatives == 0, "bank.mined_negatives",
                     "0 for image runs (re-encoding mined texts is a text feature)", self.bank.mined_negatives)
            _require(not self.bank.enabled or self.bank.candidates >= 1, "bank.candidates", ">= 1 for image runs",
                     self.bank.candidates)
        if self.data.is_text and not (self.moco.in_batch_negatives or self.moco.queue_size or self.bank.enabled):
            raise ConfigValueError("moco.in_batch_negatives", "no negatives left: enable in-batch negatives, "
                                   "the queue (moco.queue_size > 0) or the bank (bank.enabled)")
        m = self.mochi
        if not m.enabled:
            return
        # MoCHi's pool is drawn from every negative a query sees.
        pool = self.moco.queue_size
        pool += self.bank.candidates * self.bank.enabled
        if self.data.is_text:
            pool += self.bank.mined_negatives * self.bank.enabled * self.train.batch_size
            pool += (self.train.batch_size - 1) * self.moco.in_batch_negatives
        _require(m.n_hard <= pool, "mochi.n_hard",
                 f"<= the negatives per query ({pool}: moco.queue_size"
                 + (" + in-batch" if self.data.is_text else "") + (" + bank.candidates" if self.bank.enabled else "") + ") when mochi.enabled", m.n_hard)
        _require(m.n_mix == 0 or m.n_hard >= 2, "mochi.n_hard",
                 f">= 2 when mochi.n_mix > 0 (n_mix={m.n_mix})", m.n_hard)
        _require(m.n_query_mix == 0 or m.n_hard >= 1, "mochi.n_hard",
                 f">= 1 when mochi.n_query_mix > 0 (n_query_mix={m.n_query_mix})", m.n_hard)
