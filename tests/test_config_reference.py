"""docs/reference/config.md is generated from the config schema and cannot drift from it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mochi_retrieval.config import reference
from mochi_retrieval.config.schema import ExperimentConfig

ROOT = Path(__file__).parents[1]
PAGE = ROOT / reference.DEFAULT_PATH


def test_every_config_key_is_documented():
    missing = reference.undocumented()
    assert not missing, (f"config keys without documentation: {missing}; add a docstring below each field (or an "
                         f"entry in its class's Attributes: block), then run `{reference.COMMAND}`")


def test_config_reference_matches_the_schema():
    assert PAGE.is_file(), f"{PAGE} is missing: run `{reference.COMMAND}` from the repository root"
    assert PAGE.read_text() == reference.config_reference(), (
        f"{reference.DEFAULT_PATH} is out of date with mochi_retrieval/config/schema.py: run `{reference.COMMAND}` "
        "from the repository root and commit the result")


def test_every_key_has_a_row():
    text = PAGE.read_text()
    for key, cls in reference.sections():
        for f in dataclasses.fields(cls):
            assert f"| `{key}.{f.name}` |" in text, f"{key}.{f.name}"
    for f in dataclasses.fields(ExperimentConfig):
        if not dataclasses.is_dataclass(f.type) and f.name not in dict(reference.sections()):
            assert f"| `{f.name}` |" in text, f.name


def test_both_documentation_forms_are_read():
    """A field docstring (the program's sections) and a class's Attributes: block (the library's settings),
    a subclass's text overriding its base's, and one entry naming two fields."""

    @dataclasses.dataclass
    class Base:
        """Settings.

        Attributes:
            a: first,
                continued.
            b, c: shared.
        """

        a: int = 1
        b: float | None = None
        c: str = "x"

    @dataclasses.dataclass
    class Child(Base):
        c: str = "y"
        """Overridden."""
        d: tuple[int, ...] = (1, 2)

    docs = reference.field_docs(Child)
    assert docs == {"a": "first, continued.", "b": "shared.", "c": "Overridden."}
    assert reference.format_type(float | None) == "float or null"
    assert reference.format_default(dataclasses.fields(Child)[3]) == "[1, 2]"
