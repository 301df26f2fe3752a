"""The committed stubs in moesaic/proto/ match what tools/gen_proto.py generates now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_fresh(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "moesaic" / "proto"
    generated = sorted(p.name for p in out.iterdir() if p.is_file())
    assert generated == sorted(
        p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")
    )
    stale = [name for name in generated if (out / name).read_text() != (committed / name).read_text()]
    assert not stale, f"stale stubs {stale}: run `make proto` (python tools/gen_proto.py) and commit"
