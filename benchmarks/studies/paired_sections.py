"""Paired differences across gathers: the per-seed rows of several ``fashion_mnist.py`` sections of RESULTS.md,
joined and paired by seed.

A gather (``fashion_mnist.py --gather-only``) sees only the run folders on this machine; rows trained in earlier
sessions live on in the per-seed tables of RESULTS.md. This joins the tables of the sections named by their UTC
stamps (a row that two sections both hold must agree), then prints the mean of every row over the seeds and
``fashion_mnist.py``'s pairs (:data:`fashion_mnist.PAIRS`) whose rows ran on every seed, seed by seed. The tables
hold 4 decimals, so a mean here may differ from the gather's own in the 4th.

    python benchmarks/studies/paired_sections.py --sections "2026-11-29 22:08" "2026-11-29 23:08" --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, fashion_mnist

from common import RESULTS, append_results, markdown_table  # noqa: E402
from fashion_mnist import PAIRS, ROWS, spread  # noqa: E402

TITLE = "fashion_mnist: MoCo-v2, MoCHi, oracle, bank vs floors"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d) UTC;", re.M)
HEADER = "| method | seed | kNN top-1 | linear top-1 |"


def sections(text: str) -> dict[str, str]:
    """{UTC stamp: body} of the fashion_mnist table sections (two stamped the same minute: bodies joined)."""
    out: dict[str, str] = {}
    for part in text.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        stamp = STAMP.search(body)
        if title.strip() == TITLE and stamp:
            out[stamp.group(1)] = out.get(stamp.group(1), "") + "\n" + body
    return out


def seed_rows(body: str) -> dict[tuple[str, int], tuple[float, float | None]]:
    """{(method, seed): (kNN, linear or None)} from a section's per-seed table (rows of :data:`ROWS` only)."""
    names = {name for name, _ in ROWS.values()}
    rows, inside = {}, False
    for line in body.splitlines():
        if line.startswith(HEADER):
            inside = True
            continue
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if inside and cells[0] in names and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = (float(cells[2]), None if cells[3] == "-" else float(cells[3]))
    return rows


def joined(text: str, stamps: list[str]) -> dict[tuple[str, int], tuple[float, float | None]]:
    found = sections(text)
    missing = [s for s in stamps if s not in found]
    if missing:
        raise SystemExit(f"no {TITLE!r} section stamped {', '.join(missing)} in {RESULTS}")
    rows, source = {}, {}
    for stamp in stamps:
        for key, value in seed_rows(found[stamp]).items():
            if key in rows and rows[key] != value:
                raise SystemExit(f"{key[0]} seed {key[1]}: {rows[key]} in {source[key]} but {value} in {stamp}")
            rows[key], source[key] = value, source.get(key, stamp)
    return rows


def tables(rows: dict[tuple[str, int], tuple[float, float | None]], seeds: list[int]) -> str:
    means = []
    for name, _ in ROWS.values():
        got = [rows[(name, s)] for s in seeds if (name, s) in rows]
        if got:
            means.append([name, len(got), spread([k for k, _ in got]),
                          spread([lin for _, lin in got if lin is not None])])
    paired = []
    for row, base in PAIRS:
        a, b = ROWS[row][0], ROWS[base][0]
        if not all((a, s) in rows and (b, s) in rows for s in seeds):
            continue
        cells = []
        for i in (0, 1):
            d = [100 * (rows[(a, s)][i] - rows[(b, s)][i]) for s in seeds
                 if rows[(a, s)][i] is not None and rows[(b, s)][i] is not None]
            cells += [", ".join(f"{x:+.2f}" for x in d) or "-",
                      f"{statistics.fmean(d):+.2f} ± {statistics.stdev(d):.2f}" if len(d) > 1 else "-"]
        paired.append([f"{a} − {b}", *cells])
    return (markdown_table(["method", "seeds", "kNN mean ± sd", "linear mean ± sd"], means) + "\n\n"
            + markdown_table(["difference, paired by seed (points)", "kNN per seed", "kNN mean ± sd",
                              "linear per seed", "linear mean ± sd"], paired))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", required=True, metavar="STAMP",
                   help='UTC stamps of the sections to join, as RESULTS.md prints them ("2026-11-29 22:08")')
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    out = tables(joined(RESULTS.read_text(), args.sections), args.seeds)
    print(out)
    if not args.no_write:
        append_results("fashion_mnist: rows of several gathers, paired by seed",
                       f"sections {', '.join(args.sections)}; seeds {args.seeds}\n\n{out}")


if __name__ == "__main__":
    main()
