"""Dependencies run one way: the layout table of docs/design.md lists the package top to bottom, and every import
inside the package (lazy ones included) goes from a row to a row below it."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "mochi_retrieval"


def layout_rows() -> list[list[str]]:
    """Top-level modules and packages of each row of the layout table (docs/design.md), top first."""
    section = (ROOT / "docs" / "design.md").read_text().split("## Layout\n", 1)[1]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `mochi_retrieval/"):
            continue
        names = re.findall(r"`([^`]+)`", line.split("|")[1])
        rows.append([n.removeprefix("mochi_retrieval/").removesuffix(".py").rstrip("/") for n in names])
    return rows


def imported_tops(path: Path) -> set[str]:
    """First component below ``mochi_retrieval`` of every package import in ``path``."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    pkg = list(rel.parts[:-1])
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)]
            targets = [base + node.module.split(".")] if node.module else [base + [a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mochi_retrieval."):
            targets = [node.module.split(".")[1:]]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.startswith("mochi_retrieval.")]
        else:
            continue
        tops.update(t[0] for t in targets if t)
    return tops


def test_every_module_is_in_the_layout_table():
    listed = {name for row in layout_rows() for name in row}
    modules = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").is_file()) and not p.name.startswith("__")}
    assert modules <= listed, f"missing from the layout table of docs/design.md: {sorted(modules - listed)}"


def test_imports_only_go_down_the_layout():
    rank = {name: i for i, row in enumerate(layout_rows()) for name in row}
    upward = []
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top not in rank:
            continue
        upward += [f"{path.relative_to(ROOT)} imports {t}" for t in imported_tops(path)
                   if t != top and t in rank and rank[t] < rank[top]]
    assert not upward, upward
