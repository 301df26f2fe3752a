"""Raw results of a benchmark run, with what produced them: ``bench/results/NAME.json``.

    write_results("node_overhead", summary)  # adds command, commit, machine, date

Every benchmark writes through this, so a figure in BENCHMARKS.md can be traced to the command
line, the commit and the machine that measured it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    """CPU model (or machine type), CPU count and Python version of this host."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def commit() -> str:
    """The checkout's commit, with ``+dirty`` when the tree has uncommitted changes;
    ``$MOESAIC_COMMIT`` when set (a copy of the tree on another machine, whose git may be stale)."""
    if os.environ.get("MOESAIC_COMMIT"):
        return os.environ["MOESAIC_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MOESAIC_COMMIT", "unknown")
    return head + ("+dirty" if dirty.strip() else "")


def write_results(name: str, summary: dict[str, Any], *, out: Path | None = None) -> Path:
    """Write ``summary`` plus provenance to ``out`` (default ``bench/results/NAME.json``)."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit(),
        "machine": summary.pop("machine", None) or machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **summary,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
