"""benchmarks/studies/paired_sections.py: rows of several RESULTS.md gathers joined and paired by seed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "studies"))  # the script adds benchmarks/
import paired_sections as ps  # noqa: E402


def section(stamp: str, rows: list[tuple[str, int, str, str]]) -> str:
    table = "\n".join(f"| {m} | {s} | {k} | {lin} | 100 | mon | 0.7 |" for m, s, k, lin in rows)
    return (f"\n## fashion_mnist: MoCo-v2, MoCHi, oracle, bank vs floors\n\n`python ...`\n\n{stamp} UTC; cpu\n\n"
            "| method | seed | kNN top-1 | linear top-1 | wall s | monitors | kNN monitor |\n"
            "|---|---|---|---|---|---|---|\n"
            f"{table}\n\n| method | seeds | kNN mean ± sd |\n|---|---|---|\n| MoCo-v2 | 2 | 0.5 ± 0.1 |\n")


def test_two_gathers_are_paired_by_seed():
    text = ("# RESULTS\n" + section("2026-01-01 10:00", [("MoCo-v2", 0, "0.8000", "0.8500"),
                                                        ("MoCo-v2", 1, "0.8100", "0.8400"),
                                                        ("raw pixels", 0, "0.7000", "-")])
            + "\n## other: a timing\n\n2026-01-01 10:30 UTC; cpu\n\n| method | seed | kNN top-1 | linear top-1 |\n"
            + section("2026-01-01 11:00", [("MoCo-v2 + MoCHi", 0, "0.8030", "0.8490"),
                                           ("MoCo-v2 + MoCHi", 1, "0.8150", "-"),
                                           ("MoCo-v2", 1, "0.8100", "0.8400")]))  # the same row again: agrees
    rows = ps.joined(text, ["2026-01-01 10:00", "2026-01-01 11:00"])
    assert rows[("MoCo-v2 + MoCHi", 1)] == (0.815, None) and ("raw pixels", 0) not in rows
    out = ps.tables(rows, [0, 1])
    assert "| MoCo-v2 + MoCHi − MoCo-v2 | +0.30, +0.50 | +0.40 ± 0.14 | -0.10 | - |" in out
    assert "| MoCo-v2 | 2 | 0.8050 ± 0.0071 | 0.8450 ± 0.0071 |" in out


def test_disagreeing_rows_and_unknown_stamps_are_errors():
    text = section("2026-01-01 10:00", [("MoCo-v2", 0, "0.8000", "0.8500")]) + section(
        "2026-01-01 11:00", [("MoCo-v2", 0, "0.8001", "0.8500")])
    with pytest.raises(SystemExit, match="MoCo-v2 seed 0"):
        ps.joined(text, ["2026-01-01 10:00", "2026-01-01 11:00"])
    with pytest.raises(SystemExit, match="2026-01-01 12:00"):
        ps.joined(text, ["2026-01-01 12:00"])
