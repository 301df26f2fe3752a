"""Lean installs per role: what each role's entry module imports, and the extras in pyproject.toml.

A role's module must not import another role's packages (``python -X importtime`` lists every
module a fresh interpreter loads), and a package that is not installed gives a
:class:`~moesaic.runtime.engine.MissingExtraError` naming the extra to install (simulated with a
``None`` entry in ``sys.modules``, which makes ``import`` fail as for a missing package).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Packages that only some roles need: the embedded broker (demo), the MQTT client (ingest,
#: dashboard, demo), weighted boxes fusion and what it brings (coordinator), model building
#: (onnx), the runtimes (node), the dashboard's web server.
ROLE_ONLY = {"amqtt", "aiomqtt", "paho", "ensemble_boxes", "pandas", "numba", "onnx", "onnxruntime", "torch"}
#: Their distributions, none of which the core install (``pip install moesaic``) may pull.
ROLE_DISTRIBUTIONS = {"amqtt", "aiomqtt", "ensemble-boxes", "onnx", "onnxruntime", "onnxruntime-gpu", "torch"}


def imported_modules(module: str) -> set[str]:
    """Top-level names of every module a fresh interpreter loads for ``import module``."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)\s*$", run.stderr, re.MULTILINE)
    assert names, run.stderr[-2000:]
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("moesaic.cli", set()),
        ("moesaic.nodes.server", set()),  # onnxruntime / torch load with the first engine
        ("moesaic.coordinator.service", set()),  # ensemble_boxes loads at warm-up, in a coordinator
        ("moesaic.ingest.bridge", {"aiomqtt", "paho"}),
        ("moesaic.dashboard.server", {"aiomqtt", "paho"}),
    ],
)
def test_role_module_imports_no_other_roles_packages(module: str, allowed: set[str]) -> None:
    loaded = imported_modules(module)
    assert module.split(".")[0] in loaded
    assert loaded & ROLE_ONLY <= allowed, f"import {module} loads {sorted((loaded & ROLE_ONLY) - allowed)}"


def _extra(extras: dict[str, list[str]], name: str) -> set[str]:
    """Distribution names an extra installs, following ``moesaic[...]`` references."""
    names: set[str] = set()
    for requirement in extras[name]:
        match = re.match(r"moesaic\[([\w,]+)\]", requirement)
        if match:
            for inner in match.group(1).split(","):
                names |= _extra(extras, inner)
        else:
            names.add(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower())
    return names


def test_pyproject_extras_per_role() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not core & ROLE_DISTRIBUTIONS, "the core install pulls a package only some roles need"
    assert _extra(extras, "coordinator") == {"ensemble-boxes"}  # no onnxruntime, torch or amqtt
    assert _extra(extras, "ingest") == {"aiomqtt"}
    assert "amqtt" in _extra(extras, "demo")
    assert {"aiomqtt", "ensemble-boxes"} <= _extra(extras, "demo")
    for role in ("node", "coordinator", "ingest", "demo"):
        assert not _extra(extras, role) & {"onnxruntime", "onnxruntime-gpu", "torch"}, role  # add cpu or gpu
    every = _extra(extras, "all")
    for role in ("node", "coordinator", "ingest", "demo", "dashboard", "vision"):
        assert _extra(extras, role) <= every, role
    assert "onnx" in _extra(extras, "vision") and "onnx" in _extra(extras, "dev")


MISSING = [
    pytest.param(
        ["amqtt", "amqtt.broker"],
        """
        import asyncio
        from moesaic.ingest.broker import EmbeddedBroker

        async def main():
            async with EmbeddedBroker(port=0):
                pass

        asyncio.run(main())
        """,
        "amqtt",
        "demo",
        id="embedded-broker",
    ),
    pytest.param(
        ["ensemble_boxes"],
        """
        from moesaic.coordinator import fusion

        fusion.warm_up()
        """,
        "ensemble-boxes",
        "coordinator",
        id="fusion",
    ),
    pytest.param(
        ["ensemble_boxes"],
        """
        import numpy as np
        from moesaic.models.detector.slicing import Tile, merge_tiles
        from moesaic.runtime.detections import Detections

        box = Detections(np.array([[0, 0, 4, 4]], np.float32), np.ones(1, np.float32), np.zeros(1, np.int64))
        pixels = np.zeros((8, 8, 3), np.uint8)
        merge_tiles([(Tile(0, 0, pixels), box), (Tile(2, 0, pixels), box)], method="wbf")
        """,
        "ensemble-boxes",
        "coordinator",
        id="slicing",
    ),
    pytest.param(
        ["onnxruntime"],
        """
        from pathlib import Path
        from moesaic.nodes.importing import read_onnx_facts

        read_onnx_facts(Path("model.onnx"))
        """,
        "onnxruntime",
        "cpu",
        id="import-model",
    ),
    pytest.param(
        ["aiomqtt"],
        "import moesaic.ingest.bridge\n",
        "aiomqtt",
        "ingest",
        id="bridge",
    ),
]


@pytest.mark.parametrize(("absent", "code", "package", "extra"), MISSING)
def test_missing_package_names_the_extra(absent: list[str], code: str, package: str, extra: str) -> None:
    check = (
        "import sys\n"
        + "".join(f"sys.modules[{name!r}] = None\n" for name in absent)
        + "from moesaic.runtime.engine import MissingExtraError\n"
        + "try:\n"
        + textwrap.indent(textwrap.dedent(code).strip() + "\n", "    ")
        + "except MissingExtraError as exc:\n"
        + "    print(exc.package, exc.extra, exc, sep='|')\n"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    got_package, got_extra, message = run.stdout.strip().split("|")
    assert (got_package, got_extra) == (package, extra)
    assert message == f"{package} is not installed; install it with: pip install 'moesaic[{extra}]'"


def test_cli_names_the_missing_extra_without_a_traceback() -> None:
    check = (
        "import sys\n"
        "sys.modules['aiomqtt'] = None\n"
        "from moesaic.cli import main\n"
        "sys.exit(main(['ingest', '--broker', 'mqtt://127.0.0.1:1', '--coordinator', '127.0.0.1:1']))\n"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "aiomqtt is not installed; install it with: pip install 'moesaic[ingest]'" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_help_needs_no_role_package() -> None:
    """``moesaic --help`` (every command module imported) on a host with only the core install."""
    absent = sorted(ROLE_ONLY | {"aiohttp", "cv2"})
    check = (
        "import sys\n"
        f"for name in {absent!r}:\n"
        "    sys.modules[name] = None\n"
        "from moesaic.cli import main\n"
        "sys.exit(main(['--help']))\n"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "demo" in run.stdout


@pytest.mark.parametrize(
    ("absent", "embedded_broker", "expected"),
    [
        (set(), True, None),
        ({"amqtt"}, False, None),  # --broker given: no embedded broker to start
        ({"amqtt"}, True, "amqtt is not installed; install it with: pip install 'moesaic[demo]'"),
        (
            {"ensemble_boxes"},
            False,
            "ensemble-boxes is not installed; install it with: pip install 'moesaic[demo]'",
        ),
        (
            {"onnxruntime"},
            False,
            "onnxruntime is not installed; install it with: "
            "pip install 'moesaic[demo,cpu]' or pip install 'moesaic[demo,gpu]'",
        ),
    ],
)
def test_demo_names_the_missing_extra_before_starting(
    monkeypatch: pytest.MonkeyPatch, absent: set[str], embedded_broker: bool, expected: str | None
) -> None:
    import importlib.util

    from moesaic.demo import missing_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in absent else real(name))
    missing = missing_extra(embedded_broker=embedded_broker)
    assert (None if missing is None else str(missing)) == expected
