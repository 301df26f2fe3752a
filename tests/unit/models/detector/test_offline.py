"""ultralytics never touches the network or pip: in-process checks, then the detector tests
re-run inside a network namespace that has only loopback (``unshare -rn``), with an audit
hook recording every socket connect/resolve attempt."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from moesaic.models.detector.offline import OFFLINE_SETTINGS, import_ultralytics

# Not importorskip: importing ultralytics before import_ultralytics() configured it would
# let it probe DNS (its is_online check), which the offline test below would catch.
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("ultralytics not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[4]
AUDIT_SITECUSTOMIZE = """
import os, sys
_log = os.environ["MOESAIC_NET_LOG"]
def _hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto"):
        target = args[1] if event in ("socket.connect", "socket.sendto") else args[0]
        with open(_log, "a") as f:
            f.write(f"{event} {target!r}\\n")
sys.addaudithook(_hook)
"""
LOOPBACK = ("127.0.0.1", "::1", "localhost", "'127.", "('127.", "('::1'", "b'localhost'")


def _external(lines: list[str]) -> list[str]:
    """Socket attempts to anything but loopback (subprocess events are checked separately)."""
    sockets = [ln for ln in lines if ln.startswith("socket.") and "AF_UNIX" not in ln]
    return [ln for ln in sockets if not any(tok in ln.split(" ", 1)[1] for tok in LOOPBACK)]


@pytest.fixture
def socket_log() -> Iterator[list[str]]:
    """Socket connect/resolve attempts made by this process while the test runs."""
    events: list[str] = []
    active = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if active[0] and event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
            events.append(f"{event} {args[1] if event == 'socket.connect' else args[0]!r}")
        if active[0] and event == "subprocess.Popen":
            events.append(f"{event} {args[1]!r}")

    sys.addaudithook(hook)  # audit hooks cannot be removed; the flag turns this one off
    yield events
    active[0] = False


def test_switches_and_settings_are_offline(socket_log: list[str]) -> None:
    ultralytics = import_ultralytics()
    utils = sys.modules["ultralytics.utils"]
    checks = sys.modules["ultralytics.utils.checks"]
    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "False"
    assert utils.ONLINE is False and checks.ONLINE is False and checks.AUTOINSTALL is False
    for key, value in OFFLINE_SETTINGS.items():
        if key in utils.SETTINGS:
            assert utils.SETTINGS[key] == value, key
    # The font check finds the bundled font instead of downloading Arial.
    font = checks.check_font("Arial.ttf")
    assert font is not None and Path(font).parent == Path(utils.USER_CONFIG_DIR)
    assert Path(checks.check_font("Arial.Unicode.ttf")).is_file()
    # Building a model from its yaml and predicting downloads nothing.
    model = ultralytics.YOLO("yolov8n.yaml", task="detect")
    model.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)
    assert _external(socket_log) == []


def test_onnx_export_needs_no_pip(tmp_path: Path, socket_log: list[str]) -> None:
    ultralytics = import_ultralytics()
    model = ultralytics.YOLO("yolov8n.yaml", task="detect")
    weights = tmp_path / "random.pt"
    model.save(str(weights))
    out = ultralytics.YOLO(str(weights)).export(format="onnx", imgsz=64, simplify=True, opset=17)
    assert Path(out).is_file()
    # ultralytics installs missing requirements with a pip/uv subprocess: none may start.
    assert not [e for e in socket_log if e.startswith("subprocess.Popen") and ("pip" in e or "uv" in e)], (
        socket_log
    )
    assert _external(socket_log) == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_detector_tests_pass_without_network(tmp_path: Path) -> None:
    if os.environ.get("MOESAIC_IN_NETNS"):
        pytest.skip("already inside the network namespace")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user+network namespaces not permitted here: {probe.stderr.decode().strip()}")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    log = tmp_path / "net.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
        "MOESAIC_NET_LOG": str(log),
        "MOESAIC_IN_NETNS": "1",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),  # a fresh ultralytics settings dir and font copy
    }
    env.pop("YOLO_CONFIG_DIR", None)
    tests = [str(Path(__file__).parent / name) for name in
             ("test_offline.py", "test_yolo_ops.py", "test_serving.py", "test_parity.py")]  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-rn", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    attempts = log.read_text().splitlines() if log.exists() else []
    assert _external(attempts) == [], attempts
