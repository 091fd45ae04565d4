"""Griffe extension for the API reference. The docstrings are written for readers of the source: reST roles
(``:class:`~a.b.C```), double backticks, and Google-style entries that document several names at once
(``q, k: (B, D) ...``). mkdocstrings renders Markdown and parses one name per entry, so before parsing the
roles become code spans and a shared entry is repeated for each name."""
from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|obj|exc):`(~?)([\w.]+)`")
SHARED = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+)(\s*:\s.*|:)$")


def markdown(text: str) -> str:
    text = ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return text.replace("``", "`")


def split_shared_entries(text: str) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = SHARED.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = len(match.group(1))
        body = [lines[i][len(match.group(1)) + len(match.group(2)):]]
        i += 1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent:
            body.append(lines[i])
            i += 1
        for name in (n.strip() for n in match.group(2).split(",")):
            out.append(match.group(1) + name + body[0])
            out.extend(body[1:])
    return "\n".join(out)


class ReSTRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = split_shared_entries(markdown(obj.docstring.value))
