"""MkDocs hook: a page line ``<!-- argparse: package.module -->`` becomes the options table of that module's
``build_parser()``, so the command-line reference is generated from the parsers at every build."""
from __future__ import annotations

import argparse
import importlib
import re

MARKER = re.compile(r"^<!-- argparse: ([\w.]+) -->$", re.M)


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def options_table(parser: argparse.ArgumentParser) -> str:
    rows = [f"```text\n{parser.format_usage().strip()}\n```", "", "| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:  # argparse has no public iterator over its arguments
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{n}`" for n in action.option_strings) or f"`{action.dest}`"
        if action.option_strings and action.nargs != 0:
            names += f" `{action.metavar or action.dest.upper()}`"
        default = action.default
        if action.dest == "device":  # depends on the machine that builds the docs
            default = "cuda when available, else cpu"
        elif default in (None, False) or action.nargs == 0 or not action.option_strings:
            default = ""
        else:
            default = f"`{default}`"
        meaning = action.help or ""
        if action.choices:
            meaning += (" " if meaning else "") + "(one of " + ", ".join(f"`{c}`" for c in action.choices) + ")"
        if action.required and action.option_strings:
            meaning = "required; " + meaning
        rows.append(f"| {names} | {default} | {_cell(meaning)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKER.sub(lambda m: options_table(importlib.import_module(m.group(1)).build_parser()), markdown)
