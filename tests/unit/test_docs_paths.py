"""Every repository path the docs name in backticks exists (README, CONTRIBUTING, BENCHMARKS,
docs/*.md), so a moved or deleted file cannot leave a page pointing nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    REPO / "README.md",
    REPO / "CONTRIBUTING.md",
    REPO / "BENCHMARKS.md",
    *sorted((REPO / "docs").glob("*.md")),
]
TOP_LEVEL = {p.name for p in REPO.iterdir() if p.name in (".ci",) or not p.name.startswith(".")}

EXAMPLES = {
    "models/yolo-n/2/model.onnx": "a version folder the README's import-model step creates",
}
"""Paths the docs name on purpose although they are not in the repository."""


def named_paths(doc: Path) -> list[str]:
    """Backticked tokens that start with a top-level folder of the repository; MQTT topics
    (``moesaic/v1/...``), placeholders (``NAME``, ``<x>``, ``*``) and pytest node ids
    (``file.py::test``) are told apart."""
    found = []
    for match in re.finditer(r"`([^`\s]+)`", doc.read_text(encoding="utf-8")):
        token = match.group(1).split("::")[0].split(":")[0].rstrip(".,;)")
        if "/" not in token or token.startswith("moesaic/v1/") or re.search(r"[*{}<>+]|[A-Z]{3,}", token):
            continue
        if token.split("/")[0] in TOP_LEVEL:
            found.append(token)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_the_docs_name_exists(doc: Path) -> None:
    missing = [p for p in named_paths(doc) if p not in EXAMPLES and not (REPO / p).exists()]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_the_check_sees_paths() -> None:
    """The scan finds the paths a page names (an empty scan would pass vacuously)."""
    assert "moesaic/nodes/validation.py" in named_paths(REPO / "CONTRIBUTING.md")
    assert len(named_paths(REPO / "README.md")) >= 10
