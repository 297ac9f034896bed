"""Every ```python block of docs/integrations.md runs as written (each in a fresh namespace).

Blocks fenced as ```python skip are illustrations that need a real model/dataset and are
not run; blocks that import trl are skipped when TRL is not installed.
"""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
_BLOCK = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks():
    text = DOC.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        info, code = match.group(1).strip(), match.group(2)
        if info == "python":
            line = text[: match.start()].count("\n") + 1
            found.append(pytest.param(code, id=f"line{line}"))
    return found


def test_doc_has_examples():
    assert len(_blocks()) >= 5


@pytest.mark.parametrize("code", _blocks())
def test_doc_block_runs(code):
    if re.search(r"^\s*(from|import) trl\b", code, re.M):
        pytest.importorskip("trl")
    exec(compile(code, str(DOC), "exec"), {"__name__": "__doc_example__"})
