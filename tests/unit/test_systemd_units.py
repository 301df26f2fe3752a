"""systemd unit files: rendering, `moesaic install-units`, `systemd-analyze verify`, deploy/ up to date."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moesaic.cli import main
from moesaic.systemd.units import UNIT_NAMES, UnitsConfig, load_units_config, render_units

REPO = Path(__file__).resolve().parents[2]
VENV_MOESAIC = Path(sys.executable).parent / "moesaic"


def moesaic_executable(tmp_path: Path) -> Path:
    """The venv's moesaic (verify needs ExecStart to exist); a stand-in script when not installed."""
    if VENV_MOESAIC.exists():
        return VENV_MOESAIC.absolute()
    stub = tmp_path / "bin" / "moesaic"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


def test_install_units_writes_units_that_systemd_analyze_verifies(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    exe = moesaic_executable(tmp_path)
    ingest_yaml = tmp_path / "ingest.yaml"
    ingest_yaml.write_text("username: moesaic\npassword_credential: mqtt-password\n")
    prefix = tmp_path / "units"
    status = main(
        [
            "install-units",
            "--prefix",
            str(prefix),
            "--executable",
            str(exe),
            "--ingest-config",
            str(ingest_yaml),
        ]
    )
    assert status == 0
    assert sorted(p.name for p in prefix.iterdir()) == sorted(UNIT_NAMES)
    (prefix / "moesaic-node@jetson1.service").symlink_to("moesaic-node@.service")
    units = [*UNIT_NAMES[1:], "moesaic-node@jetson1.service"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *units], cwd=prefix, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
    ingest = (prefix / "moesaic-ingest.service").read_text()
    assert "LoadCredential=mqtt-password:/etc/moesaic/credentials/mqtt-password" in ingest
    assert f"ExecStart={exe} ingest --config /etc/moesaic/ingest.yaml" in ingest


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above could fail: a misspelt key and a missing binary are both reported."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    units = render_units(UnitsConfig(executable=tmp_path / "missing" / "moesaic"))
    path = tmp_path / "moesaic-ingest.service"
    path.write_text(units["moesaic-ingest.service"].replace("ProtectSystem=", "ProtectSistem="))
    result = subprocess.run(
        ["systemd-analyze", "verify", path.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert "ProtectSistem" in result.stderr and "not executable" in result.stderr


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_every_unit_is_notify_watchdog_restart_and_hardened(name: str) -> None:
    text = render_units(UnitsConfig())[name]
    for line in (
        "Type=notify",
        "WatchdogSec=30",
        "Restart=on-failure",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
    ):
        assert f"\n{line}\n" in text, f"{name} lacks {line}"


def test_user_credentials_and_environment_are_rendered() -> None:
    config = UnitsConfig(
        user="moesaic",
        watchdog_sec=10,
        credentials={"node": {"tls-key": Path("/etc/moesaic/node.key")}},
        environment={"node": {"MOESAIC_NODE_TLS__KEY": "%d/tls-key"}},
    )
    node = render_units(config)["moesaic-node@.service"]
    assert "User=moesaic\nGroup=moesaic" in node and "DynamicUser" not in node
    assert "LoadCredential=tls-key:/etc/moesaic/node.key" in node
    assert 'Environment="MOESAIC_NODE_TLS__KEY=%d/tls-key"' in node
    assert "WatchdogSec=10" in node and "--config /etc/moesaic/nodes/%i.yaml --node-id %i" in node


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("executable: relative/moesaic\n", "executable"),
        ("watchdog_sec: 1\n", "watchdog_sec"),
        ("credentials: {gpu: {a: /x}}\n", "credentials"),
        ("colour: blue\n", "colour"),
    ],
)
def test_bad_units_config_names_file_and_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    path = tmp_path / "units.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=rf"{path}.*{field}"):
        load_units_config(path)


def test_deploy_units_match_the_generator() -> None:
    """deploy/systemd/ holds the default units; regenerate with the command in its README."""
    for name, text in render_units(UnitsConfig()).items():
        assert (REPO / "deploy" / "systemd" / name).read_text() == text, f"deploy/systemd/{name} is stale"


EXPOSURE_LIMITS = {
    "moesaic-coordinator.service": 2.5,
    "moesaic-ingest.service": 2.5,
    "moesaic-node@.service": 3.0,
}


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_systemd_analyze_security_exposure_per_unit(tmp_path: Path, name: str) -> None:
    """`systemd-analyze security` rates each unit at most 2.5 (coordinator, bridge) / 3.0 (GPU node)."""
    path = tmp_path / name
    path.write_text(render_units(UnitsConfig())[name])
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= EXPOSURE_LIMITS[name]


def test_units_restrict_ip_addresses_and_node_devices() -> None:
    units = render_units(UnitsConfig(allow_ips=["10.1.0.0/16"], node_devices=["char-nvmap rw"]))
    for text in units.values():
        assert "\nIPAddressDeny=any\nIPAddressAllow=10.1.0.0/16\n" in text
        assert "\nSystemCallFilter=@system-service\n" in text
    node = units["moesaic-node@.service"]
    assert "\nDevicePolicy=closed\nDeviceAllow=char-nvmap rw\n" in node
    assert "MemoryDenyWriteExecute=yes" not in node  # CUDA and JIT compilers need it
    assert "\nMemoryDenyWriteExecute=yes\n" in units["moesaic-coordinator.service"]
    open_units = render_units(UnitsConfig(allow_ips=[], node_devices=[]))
    assert all("IPAddress" not in text for text in open_units.values())
    assert "DevicePolicy" not in open_units["moesaic-node@.service"]


@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (
            ["--executable", "/tmp/venv/bin/moesaic"],
            ["ExecStart /tmp/venv/bin/moesaic is under /tmp", "PrivateTmp=yes"],
        ),
        (
            ["--executable", "/opt/m/bin/moesaic", "--config-dir", "/var/tmp/conf"],
            ["config_dir /var/tmp/conf is under /var/tmp"],
        ),
        (["--executable", "/opt/m/bin/moesaic", "--config-dir", "/home/me/conf"], ["ProtectHome=yes"]),
        (["--executable", "/opt/m/bin/moesaic", "--config-dir", "/etc/moesaic"], []),
    ],
    ids=["exec-in-tmp", "config-in-var-tmp", "config-in-home", "fine"],
)
def test_install_units_warns_about_paths_the_service_cannot_reach(
    tmp_path: Path, args: list[str], warned: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-units", "--prefix", str(tmp_path / "units"), *args]) == 0
    err = capsys.readouterr().err
    for text in warned:
        assert text in err
    assert ("warning:" in err) == bool(warned)
    assert len(list((tmp_path / "units").iterdir())) == 3  # the units are written all the same
