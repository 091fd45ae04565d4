"""Tests for mochi_retrieval.config: strict keys, types, ranges, overrides, files."""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest
import yaml

from mochi_retrieval.config import (
    ConfigError,
    ExperimentConfig,
    MoCoConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclass
class _Inner:
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    shape: tuple[int, ...] = (3, 4)
    pair: tuple[str, float] = ("a", 1.0)


@dataclass
class _Outer:
    required: int
    ratio: float = 0.5
    tag: Optional[str] = None
    mode: Literal["a", "b"] = "a"
    inner: _Inner = field(default_factory=_Inner)
    maybe: Optional[_Inner] = None
    extra: dict[str, Any] = field(default_factory=dict)


def _write(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _raises(data: dict, *fragments: str, cls: type = ExperimentConfig) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------- keys


def test_defaults_build_and_are_valid():
    cfg = from_dict(ExperimentConfig, {})
    assert cfg == ExperimentConfig()
    assert cfg.moco.queue_size == 65536 and cfg.train.lr == 0.03 and cfg.model.encoder_kwargs == {}


def test_unknown_top_level_key_suggests():
    _raises({"tarin": {}}, "unknown key 'tarin'", "did you mean 'train'")


def test_unknown_nested_key_suggests_full_dotted_key():
    msg = _raises({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'", "did you mean 'train.lr'?")
    assert msg == "unknown key 'train.lrr' (did you mean 'train.lr'?)"


def test_unknown_key_in_wrong_section_points_to_right_one():
    _raises({"lr": 0.1}, "unknown key 'lr'", "'train.lr'")
    _raises({"momentum": 0.9}, "'moco.momentum'", "'train.momentum'")


def test_unknown_key_without_close_match_lists_valid_keys():
    _raises({"moco": {"zzzz": 1}}, "unknown key 'moco.zzzz'", "valid keys:", "queue_size")


def test_missing_required_key():
    _raises({}, "missing required key 'required'", cls=_Outer)


# ----------------------------------------------------------------- types


@pytest.mark.parametrize(
    "data, key, expected",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs", "expected int"),
        ({"train": {"epochs": 10.0}}, "train.epochs", "expected int"),
        ({"name": ["a", "b"]}, "name", "expected str"),
        ({"seed": True}, "seed", "expected int"),
        ({"train": {"resume": "true"}}, "train.resume", "expected bool"),
        ({"train": {"resume": 1}}, "train.resume", "expected bool"),
        ({"moco": {"temperature": "0.2"}}, "moco.temperature", "expected float"),
        ({"model": 3}, "model", "expected a mapping"),
        ({"model": {"encoder_kwargs": [1]}}, "model.encoder_kwargs", "expected dict"),
    ],
)
def test_wrong_type_names_key_type_and_value(data, key, expected):
    msg = _raises(data, f"'{key}'", expected)
    assert "got " in msg


def test_literal_violation_lists_choices():
    _raises({"train": {"optimizer": "adam"}}, "'train.optimizer'", "'sgd'", "'adamw'", "'adam'")
    _raises({"data": {"dataset": "mnist"}}, "'data.dataset'", "'fashion_mnist'", "'imagefolder'")


def test_optional_accepts_none_and_value():
    cfg = from_dict(ExperimentConfig, {"data": {"limit": None, "class_list": None}, "train": {"max_steps": 5}})
    assert cfg.data.limit is None and cfg.train.max_steps == 5
    _raises({"data": {"limit": "all"}}, "'data.limit'", "int or None")


def test_int_accepted_for_float_and_converted():
    cfg = from_dict(ExperimentConfig, {"train": {"lr": 1}, "mochi": {"warmup_epochs": 10}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.mochi.warmup_epochs, float)


def test_lists_tuples_and_nested_optional_section():
    cfg = from_dict(_Outer, {"required": 1, "inner": {"sizes": [5], "shape": [1, 2, 3], "pair": ["x", 2]},
                             "maybe": {"sizes": []}})
    assert cfg.inner == _Inner(sizes=[5], shape=(1, 2, 3), pair=("x", 2.0))
    assert cfg.maybe == _Inner(sizes=[])
    _raises({"required": 1, "inner": {"sizes": [1, "2"]}}, "'inner.sizes[1]'", "expected int", cls=_Outer)
    _raises({"required": 1, "inner": {"pair": ["x"]}}, "'inner.pair'", "expected 2 items", cls=_Outer)
    _raises({"required": 1, "maybe": {"sise": []}}, "unknown key 'maybe.sise'", "'maybe.sizes'", cls=_Outer)


def test_free_form_dict_accepts_any_keys():
    kwargs = {"width": 2, "nested": {"anything": [1, "x"]}, "flag": None}
    cfg = from_dict(ExperimentConfig, {"model": {"encoder_kwargs": kwargs}})
    assert cfg.model.encoder_kwargs == kwargs
    assert cfg.model.encoder_kwargs is not kwargs


def test_empty_section_means_defaults():
    assert from_dict(ExperimentConfig, {"model": None}).model == ModelConfig()


# ----------------------------------------------------------------- value ranges


@pytest.mark.parametrize(
    "data, key",
    [
        ({"moco": {"temperature": 0.0}}, "moco.temperature"),
        ({"moco": {"momentum": 1.5}}, "moco.momentum"),
        ({"moco": {"queue_size": 0}}, "moco.queue_size"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"mochi": {"n_mix": -1}}, "mochi.n_mix"),
        ({"mochi": {"beta_max": 1.0}}, "mochi.beta_max"),
        ({"mochi": {"beta_max": 0.0}}, "mochi.beta_max"),
        ({"eval": {"knn_temperature": -0.1}}, "eval.knn_temperature"),
        ({"data": {"limit": 0}}, "data.limit"),
        ({"model": {"head_out_dim": 0}}, "model.head_out_dim"),
    ],
)
def test_value_range_errors_name_key(data, key):
    _raises(data, f"invalid value for '{key}'")


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="'temperature'"):
        MoCoConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="'lr'"):
        TrainConfig(lr=-1.0)


def test_cross_field_n_hard_vs_queue_size():
    msg = _raises({"moco": {"queue_size": 512}, "mochi": {"n_hard": 1024}}, "mochi.n_hard", "moco.queue_size")
    assert "1024" in msg
    cfg = from_dict(ExperimentConfig, {"moco": {"queue_size": 512}, "mochi": {"n_hard": 1024, "enabled": False}})
    assert not cfg.mochi.enabled


def test_cross_field_n_hard_at_least_two_for_pair_mixing():
    _raises({"mochi": {"n_hard": 1, "n_mix": 4}}, "mochi.n_hard", ">= 2", "n_mix")
    cfg = from_dict(ExperimentConfig, {"mochi": {"n_hard": 1, "n_mix": 0, "n_query_mix": 4}})
    assert cfg.mochi.n_hard == 1


# ----------------------------------------------------------------- files and overrides


def test_load_config_with_overrides(tmp_path):
    path = _write(tmp_path, "name: run1\ntrain:\n  lr: 0.06\n  epochs: 3\nmochi:\n  enabled: true\n")
    cfg = load_config(path, [
        "train.lr=0.1", "mochi.enabled=false", "train.max_steps=null", "data.limit=100",
        "model.encoder_kwargs.widths=[1, 2]", "model.encoder_kwargs.deep.er=x", "eval.knn_k=5",
    ])
    assert cfg.name == "run1" and cfg.train.epochs == 3 and cfg.train.lr == 0.1
    assert cfg.mochi.enabled is False and cfg.train.max_steps is None and cfg.data.limit == 100
    assert cfg.model.encoder_kwargs == {"widths": [1, 2], "deep": {"er": "x"}}
    assert cfg.eval.knn_k == 5


def test_yaml_scalars_follow_yaml_1_2(tmp_path):
    # PyYAML alone reads 1e-4 as a string and `no` as False.
    path = _write(tmp_path, "train:\n  weight_decay: 1e-4\n  mixed_precision: no\n")
    cfg = load_config(path, ["train.lr=3e-2"])
    assert cfg.train.weight_decay == 1e-4 and cfg.train.lr == 0.03
    assert cfg.train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_override_errors(tmp_path):
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        load_config(path, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="malformed override 'train.lr'"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="'train.lr' is a value, not a section"):
        load_config(path, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="expected bool"):
        load_config(path, ["train.resume=maybe"])
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path, ["train.lr=[1,"])


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing)
    assert missing in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "name: a\ntrain:\n  lr: [0.1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="YAML syntax error") as info:
        load_config(path)
    assert path in str(info.value) and "line " in str(info.value)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_save_load_round_trip_is_complete(tmp_path):
    cfg = from_dict(ExperimentConfig, {
        "name": "no", "output_dir": "1e-4",  # strings that look like other types
        "model": {"encoder_kwargs": {"a": [1, 2.5], "b": {"c": None}, "d": "true"}},
        "data": {"limit": 10}, "train": {"lr": 1e-10, "max_steps": 7, "mixed_precision": "bf16"},
    })
    out = tmp_path / "sub" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert os.listdir(out.parent) == ["config.yaml"]  # no temp file left behind
    saved = yaml.safe_load(out.read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(ExperimentConfig)}
    for section in ("model", "data", "moco", "mochi", "train", "eval"):
        assert set(saved[section]) == {f.name for f in dataclasses.fields(getattr(cfg, section))}
    assert saved["data"]["class_list"] is None and saved["name"] == "no"
    assert to_dict(cfg)["train"]["max_steps"] == 7


def test_round_trip_of_defaults_and_generic_types(tmp_path):
    save_config(ExperimentConfig(), tmp_path / "d.yaml")
    assert load_config(tmp_path / "d.yaml") == ExperimentConfig()
    outer = _Outer(required=3, maybe=_Inner(shape=(9,)), extra={"k": [1]})
    save_config(outer, tmp_path / "o.yaml")
    assert load_config(tmp_path / "o.yaml", cls=_Outer) == outer
