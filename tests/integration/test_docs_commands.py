"""README.md and docs/*.md as written: their command blocks run, in order, on a copy of the repository.

Every fenced ``bash``/``sh``/``shell``/``python`` block of a file runs, top to bottom, in one bash
session (so a server one block starts with ``&`` serves the blocks after it) whose working
directory is a fresh copy of the repository's tracked files and whose PATH starts with this
venv's ``bin`` (``moesaic``, ``python``). Python blocks run through ``python -``. Two rewrites keep
the run private on a shared machine: ``/tmp/`` becomes a temporary folder, and every loopback
port (``127.0.0.1:N``, ``0.0.0.0:N``) a free one, the same everywhere in the file.

A block opts out with a visible comment on the line before it; each opted-out block is a
skipped test case whose reason pytest's ``-ra`` summary lists::

    <!-- docs-test: skip (needs a GPU) -->

A failure names the file, the block and the line (``docs/node.md:169 (sh block), line 172: ...
failed (exit 1)``) above the blocks' output.

``<!-- docs-test: expect REGEX -->`` before a block makes its output have to match REGEX (the
README's client snippet: its budget holds).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell"}
RUNNABLE = SHELL | {"python"}
DIRECTIVE = re.compile(r"^<!-- docs-test: (skip|expect) (.+?) -->$")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
PORT = re.compile(r"\b(127\.0\.0\.1|0\.0\.0\.0|localhost):(\d{4,5})\b")
FAILED = "DOCS-TEST-FAILED"
TIMEOUT_S = 240


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, the line of its opening fence (1-based), its text."""

    lang: str
    line: int
    lines: tuple[str, ...]
    skip: str | None = None
    expect: str | None = None

    def name(self, doc: Path) -> str:
        shown = doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc.name
        return f"{shown}:{self.line} ({self.lang} block)"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the docs-test directive on the line before."""
    text = doc.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(text):
        m = FENCE.match(text[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        j = i + 1
        while not re.match(rf"^{indent}```\s*$", text[j]):
            j += 1
        prev = text[i - 1].strip() if i else ""
        d = DIRECTIVE.match(prev)
        skip = d.group(2).strip("()") if d and d.group(1) == "skip" else None
        expect = d.group(2) if d and d.group(1) == "expect" else None
        body = tuple(line[len(indent) :] for line in text[i + 1 : j])
        out.append(Block(lang, i + 1, body, skip, expect))
        i = j + 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def script(doc: Path, runnable: list[Block], tmp: Path, outputs: Path) -> tuple[str, dict[int, str]]:
    """One bash script running the blocks in order; script line -> the doc line it came from."""
    ports: dict[str, int] = {}

    def rewrite(line: str) -> str:
        line = line.replace("/tmp/", f"{tmp}/")
        return PORT.sub(lambda m: f"{m.group(1)}:{ports.setdefault(m.group(2), free_port())}", line)

    lines = [
        "set -eE -o pipefail",
        f"trap 'echo \"{FAILED} $LINENO $?: $BASH_COMMAND\" >&2' ERR",
        "trap 'trap - ERR; set +e; kill $(jobs -p) 2>/dev/null; wait' EXIT",  # servers started with &
    ]
    where: dict[int, str] = {}
    for k, block in enumerate(runnable):
        name = block.name(doc)
        lines.append(f'exec >"{outputs}/{k}.out" 2>&1')
        lines.append(f"echo '>>> {name}'")
        if block.lang == "python":
            where[len(lines) + 1] = f"{name}, line {block.line + 1}: python -"
            lines.append("python - <<'DOCS_TEST_PY'")
            lines.extend(rewrite(line) for line in block.lines)
            lines.append("DOCS_TEST_PY")
        else:
            for n, line in enumerate(block.lines):
                where[len(lines) + 1] = f"{name}, line {block.line + 1 + n}: {line.strip()}"
                lines.append(rewrite(line))
    return "\n".join(lines) + "\n", where


def test_command_blocks_are_labelled() -> None:
    """A block that starts like a command says its language, so it runs or says why not."""
    unlabelled = [
        b.name(doc)
        for doc in DOCS
        for b in blocks(doc)
        if not b.lang and b.lines and re.match(r"^(\$ |moesaic |sudo |pip |make |python )", b.lines[0])
    ]
    assert not unlabelled, f"command blocks without a language: {unlabelled}"


def copy_tracked(work: Path) -> None:
    """The repository's tracked files, as a fresh clone has them (with this tree's edits)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)


def run_doc(doc: Path, runnable: list[Block], tmp_path: Path, cwd: Path) -> str | None:
    """Run the blocks in one bash session in ``cwd``; None, or what failed and its output."""
    scratch, outputs = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    outputs.mkdir()
    text, where = script(doc, runnable, scratch, outputs)
    (tmp_path / "docs.sh").write_text(text)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(scratch)
    env["MOESAIC_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.Popen(["bash", str(tmp_path / "docs.sh")], cwd=cwd, env=env, start_new_session=True)
    try:
        proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):  # what the blocks left running
            os.killpg(proc.pid, signal.SIGKILL)
    outs = [outputs / f"{k}.out" for k in range(len(runnable))]
    log = "".join(o.read_text(errors="replace") for o in outs if o.exists())
    print(log)
    if proc.returncode == -signal.SIGKILL:
        return f"{doc.name}: the command blocks ran past {TIMEOUT_S} s\n{log[-4000:]}"
    failed = re.search(rf"{FAILED} (\d+) (\d+): ", log)
    if failed or proc.returncode != 0:
        at = where.get(int(failed.group(1)), "?") if failed else doc.name
        code = failed.group(2) if failed else proc.returncode
        return f"{at} failed (exit {code})\n{log[-4000:]}"
    for b, out in zip(runnable, outs, strict=True):
        if b.expect is not None and not re.search(b.expect, out.read_text(), re.MULTILINE):
            return f"{b.name(doc)}: output does not match {b.expect!r}:\n{out.read_text()[-4000:]}"
    return None


def runnable_blocks(doc: Path) -> list[Block]:
    """The blocks that run; prints each opted-out block with its reason."""
    every = [b for b in blocks(doc) if b.lang in RUNNABLE]
    for b in every:
        if b.skip is not None:
            assert b.skip.strip(), f"{b.name(doc)}: a skip needs a reason"
            print(f"skipped {b.name(doc)}: {b.skip}")
    return [b for b in every if b.skip is None]


@pytest.mark.slow  # ~2 min for all files on the 2-core VM; `make test` runs slow tests too
@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_doc_commands_run(doc: Path, tmp_path: Path) -> None:
    runnable = runnable_blocks(doc)
    if not runnable:
        pytest.skip(f"{doc.name}: every command block is opted out (reasons printed above)")
    copy_tracked(tmp_path / "repo")
    failure = run_doc(doc, runnable, tmp_path, tmp_path / "repo")
    if failure:
        pytest.fail(failure)


OPTED_OUT = [(doc, b) for doc in DOCS for b in blocks(doc) if b.lang in RUNNABLE and b.skip is not None]


@pytest.mark.parametrize(("doc", "block"), OPTED_OUT, ids=[b.name(d) for d, b in OPTED_OUT])
def test_opted_out(doc: Path, block: Block) -> None:
    """Each opted-out block, listed with its reason among the skipped tests."""
    assert block.skip and block.skip.strip(), f"{block.name(doc)}: a skip needs a reason"
    pytest.skip(f"{block.name(doc)}: {block.skip}")


FAKE_DOC = """# A page

<!-- docs-test: skip (never runs) -->
```sh
touch skipped
```

```sh
sleep 300 &                  # a server left running is stopped at the end
echo one > one
python -c "import sys; sys.exit(3)"
touch never
```
"""


def test_a_failing_line_is_named(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    doc.write_text(FAKE_DOC)
    runnable = runnable_blocks(doc)
    assert [b.line for b in runnable] == [8]
    (tmp_path / "cwd").mkdir()
    failure = run_doc(doc, runnable, tmp_path, tmp_path / "cwd")
    assert failure is not None
    assert failure.startswith(
        'page.md:8 (sh block), line 11: python -c "import sys; sys.exit(3)" failed (exit 3)'
    )
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == ["one"]
