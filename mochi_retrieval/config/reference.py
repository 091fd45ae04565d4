"""The config reference, generated from the schema: one table per section with each key's type, default and
meaning, read from the dataclasses and their docstrings.

Regenerate the documentation page (``tests/test_config_reference.py`` fails when it is out of date)::

    python -m mochi_retrieval.config.reference          # writes docs/reference/config.md

A key is documented either by a docstring right below its field (the program's sections) or by an entry of
the class docstring's ``Attributes:`` block (the library's settings, e.g.
:class:`~mochi_retrieval.bank.BankSettings`); a subclass's documentation of a key wins over its base's.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from .schema import ExperimentConfig

COMMAND = "python -m mochi_retrieval.config.reference"
DEFAULT_PATH = Path("docs/reference/config.md")

_ATTRIBUTE = re.compile(r"^(\w+(?:\s*,\s*\w+)*)\s*:\s*(.*)$")  # "name: text" or "a, b: text"
_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|obj):`~?([\w.]+)`")


def _attribute_block(doc: str | None) -> dict[str, str]:
    """``{name: text}`` from a Google-style ``Attributes:`` block of a class docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in lines[start:]:
        if line.strip() and not line.startswith(" "):  # the next block
            break
        text = line.strip()
        match = _ATTRIBUTE.match(text) if line.startswith("    ") and not line.startswith("     ") else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for name in names:
                docs[name] = match.group(2)
        elif text:
            for name in names:
                docs[name] += " " + text
    return docs


def _field_docstrings(cls: type) -> dict[str, str]:
    """``{name: docstring}`` of the string literals right below a class's annotated fields."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Documentation of each field of a dataclass, from its bases up (a subclass's text wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_attribute_block(klass.__doc__))
            docs.update(_field_docstrings(klass))
    return docs


def sections() -> list[tuple[str, type]]:
    """``(key, dataclass)`` of each section of :class:`ExperimentConfig`, in file order."""
    hints = typing.get_type_hints(ExperimentConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(ExperimentConfig)
            if dataclasses.is_dataclass(hints[f.name])]


def undocumented() -> list[str]:
    """Dotted keys that have no documentation (the reference must be complete)."""
    missing = []
    top = field_docs(ExperimentConfig)
    missing += [f.name for f in dataclasses.fields(ExperimentConfig) if not top.get(f.name)]
    for key, cls in sections():
        docs = field_docs(cls)
        missing += [f"{key}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
    return missing


def format_type(tp: Any) -> str:
    """A type as a YAML user reads it: ``int or null``, ``"sgd" or "adamw"``, ``[float, float]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join([format_type(a) for a in rest] + (["null"] if len(rest) < len(args) else []))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {format_type(args[0])}"
        return "[" + ", ".join(format_type(a) for a in args) + "]"
    if origin in (dict, list):
        return "mapping" if origin is dict else f"list of {format_type(args[0])}"
    return getattr(tp, "__name__", str(tp))


def format_default(f: dataclasses.Field) -> str:
    """A field's default as YAML would write it."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _markdown(doc: str) -> str:
    """One table cell: reST roles and double backticks as Markdown code, one line, pipes escaped."""
    text = " ".join(_ROLE.sub(lambda m: f"`{m.group(1)}`", doc).replace("``", "`").split())
    first = text.split(" ", 1)[0].strip(",:;'")
    if (len(first) > 1 or first == "a") and first.islower():  # a sentence, not a symbol such as "c, detached negatives"
        text = text[0].upper() + text[1:]
    return text.replace("|", "\\|")


def _table(cls: type, prefix: str) -> list[str]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        rows.append(f"| `{prefix}{f.name}` | {format_type(hints[f.name])} | `{format_default(f)}` | "
                    f"{_markdown(docs.get(f.name, ''))} |")
    return rows


def config_reference() -> str:
    """The Markdown page: the top-level keys, then one table per section.

    Raises:
        ValueError: a key has no documentation (named in the message).
    """
    missing = undocumented()
    if missing:
        raise ValueError(f"config keys without documentation: {', '.join(missing)} (document each field where "
                         "its dataclass defines it: a docstring below the field, or the class's Attributes: block)")
    top = field_docs(ExperimentConfig)
    lines = [
        "# Config reference",
        "",
        f"<!-- Generated by `{COMMAND}` from mochi_retrieval/config/schema.py; do not edit. -->",
        "",
        "Every key that `python -m mochi_retrieval.train CONFIG.yaml [dotted.key=value ...]` accepts, with its "
        "type, default and meaning, generated from the config schema (`mochi_retrieval/config/schema.py` and the "
        "library settings it reuses). Unknown keys are an error that suggests the nearest valid key. On the "
        "command line a key is written with its section, e.g. `train.max_steps=20`.",
        "",
        "## Top level",
        "",
        *_table(ExperimentConfig, ""),
    ]
    for key, cls in sections():
        lines += ["", f"## {key}", "", _markdown(top[key]), ""]
        base = next((b for b in cls.__mro__[1:] if dataclasses.is_dataclass(b)), None)
        if base is not None:
            lines += [f"The library's settings `{base.__module__}.{base.__qualname__}`, plus the switch "
                      f"`{key}.enabled`.", ""]
        elif cls.__module__ != ExperimentConfig.__module__:
            lines += [f"The library's settings `{cls.__module__}.{cls.__qualname__}`.", ""]
        lines += _table(cls, f"{key}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference to ``argv[0]`` (default ``docs/reference/config.md``)."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_reference())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
