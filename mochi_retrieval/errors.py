"""Exception types shared by the library's settings, data loaders, evaluation and the config engine.

A leaf module (no imports of the package), so that any floor can raise them.
"""

from __future__ import annotations

from typing import Any


class EvalInputError(ValueError):
    """Bad input to an evaluation: a data folder in the wrong layout, qrels that
    name unknown ids, an empty split, a model path that loads nothing, a k larger
    than the corpus. The command line prints its message and exits non-zero,
    without a traceback."""


class ConfigError(ValueError):
    """A configuration is invalid; the message names the dotted key at fault."""


class ConfigValueError(ConfigError):
    """A value is out of range. ``key`` is dotted relative to the class that raised it (the config engine
    prefixes the section, e.g. ``beta_max`` -> ``mochi.beta_max``)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid value for '{key}': {reason}")
        self.key, self.reason = key, reason


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise :class:`ConfigValueError` ``'key': must be <rule>, got <value>`` unless ``ok``.

    What every settings dataclass's ``__post_init__`` uses, so that a value is checked once, where it is
    defined, with the same message whether it came from YAML or from Python.
    """
    if not ok:
        raise ConfigValueError(key, f"must be {rule}, got {value!r}")
