"""Fleet config: YAML errors name the file and field, env overrides, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesaic.coordinator.config import load_fleet

GOOD = """
coordinator:
  overhead_ms: 3
  max_experts: 2
nodes:
  - address: 127.0.0.1:7001
    name: jetson
    experts:
      - {model: yolo, latency_ms: 12, energy_mj: 80}
  - address: 127.0.0.1:7002
tasks:
  detection: {gate: gates/det.json, validation: /abs/det.npz, max_experts: 3}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_good_config_and_relative_paths(tmp_path: Path) -> None:
    config = load_fleet(write(tmp_path, GOOD), env={})
    assert config.coordinator.overhead_ms == 3 and config.coordinator.max_experts == 2
    assert config.nodes[0].experts[0].latency_ms == 12 and config.nodes[1].name is None
    assert config.tasks["detection"].gate == tmp_path / "gates/det.json"
    assert config.tasks["detection"].validation == Path("/abs/det.npz")


def test_env_overrides_coordinator_settings(tmp_path: Path) -> None:
    env = {"MOESAIC_COORDINATOR_OVERHEAD_MS": "7.5", "MOESAIC_COORDINATOR_DEFAULT_BUDGET": "{latency_ms: 40}"}
    config = load_fleet(write(tmp_path, GOOD), env=env)
    assert config.coordinator.overhead_ms == 7.5 and config.coordinator.default_budget.latency_ms == 40
    with pytest.raises(ValueError, match="MOESAIC_COORDINATOR_NOPE: coordinator has no setting 'nope'"):
        load_fleet(write(tmp_path, GOOD), env={"MOESAIC_COORDINATOR_NOPE": "1"})
    with pytest.raises(ValueError, match=r"coordinator\.overhead_ms"):
        load_fleet(write(tmp_path, GOOD), env={"MOESAIC_COORDINATOR_OVERHEAD_MS": "-1"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes:\n  - adress: 127.0.0.1:1\n", r"nodes\[0\]\.adress: Extra inputs are not permitted"),
        (
            "nodes:\n  - address: 127.0.0.1:1\n    experts: [{model: m, latency_ms: -3}]\n",
            r"nodes\[0\]\.experts\[0\]\.latency_ms: Input should be greater than or equal to 0",
        ),
        ("coordinator: {ewma_alpha: 2}\n", r"coordinator\.ewma_alpha"),
        ("coordinator: {overhed_ms: 2}\n", r"coordinator\.overhed_ms: Extra inputs"),
        ("tasks: {detection: {gates: x}}\n", r"tasks\.detection\.gates"),
        ("nodes:\n  - address: a:1\n  - address: a:1\n", "listed twice"),
        ("nodes:\n  - address: a:1\n    experts: [{model: m}, {model: m}]\n", r"model 'm' listed twice"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("nodes: [\n", "not valid YAML"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_fleet(write(tmp_path, text), env={})
    assert str(tmp_path / "fleet.yaml") in str(info.value)


def test_empty_file_is_a_valid_empty_fleet(tmp_path: Path) -> None:
    assert load_fleet(write(tmp_path, ""), env={}).nodes == []
    with pytest.raises(ValueError, match="cannot read"):
        load_fleet(tmp_path / "missing.yaml", env={})
