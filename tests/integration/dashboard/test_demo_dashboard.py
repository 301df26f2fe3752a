"""``moesaic demo --dashboard HOST:PORT``: the demo's fleet shows live in a real browser within
30 s of the demo's start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from moesaic.fleet import free_port
from tests.integration.dashboard.test_dashboard_browser import Visit
from tests.integration.demo.demo_models import write_demo_experts

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


def test_the_demo_serves_its_fleet_live_within_30_s(chromium: Any, tmp_path: Path) -> None:
    models = write_demo_experts(tmp_path / "models")
    port = free_port()
    args = ["demo", "--models", str(models), "--report", str(tmp_path / "report"), "--no-live"]
    args += ["--cache", str(tmp_path / "cache"), "--duration", "20", "--dashboard", f"127.0.0.1:{port}"]
    started = time.monotonic()
    demo = subprocess.Popen(
        [sys.executable, "-m", "moesaic", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        visit = None
        while visit is None and time.monotonic() - started < 30:
            try:
                visit = Visit(chromium, url, {"width": 1366, "height": 900})
            except Exception:  # not listening yet
                time.sleep(0.5)
        assert visit is not None, "the dashboard did not answer within 30 s"
        try:
            left_ms = max(1, int((30 - (time.monotonic() - started)) * 1000))
            visit.page.wait_for_selector("#connection.live", timeout=left_ms)
            for name in ("edge-a", "edge-b", "edge-c"):  # the demo's nodes, each listed and serving
                card = visit.page.locator(f"article.node:has(h3:text-is('{name}'))")
                left_ms = max(1, int((30 - (time.monotonic() - started)) * 1000))
                card.locator(".badge:text-is('serving')").wait_for(timeout=left_ms)
            assert time.monotonic() - started < 30
            assert visit.refused == [] and visit.page_errors == []
        finally:
            visit.close()
        output, _ = demo.communicate(timeout=180)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, output[-2000:]
    assert f"dashboard: {url}" in output
