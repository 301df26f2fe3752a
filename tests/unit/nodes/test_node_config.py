"""Node config: YAML, MOESAIC_NODE_* overrides, errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesaic.nodes.config import load_node_config


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("node_id: n1\nlisten: 0.0.0.0:9000\nmodels: models\ntls: {cert: a.pem, key: a.key}\n")
    env = {"MOESAIC_NODE_LISTEN": "127.0.0.1:9001", "MOESAIC_NODE_TLS__CLIENT_CA": "ca.pem", "OTHER": "x"}
    config = load_node_config(path, env=env, overrides={"node_id": "n2", "device": None})
    assert config.node_id == "n2"
    assert config.listen == "127.0.0.1:9001"
    assert config.models == tmp_path / "models"  # relative to the config file
    assert (
        config.tls is not None and config.tls.client_ca == Path("ca.pem") and config.tls.cert == Path("a.pem")
    )
    assert config.device == "cpu"


@pytest.mark.parametrize(
    ("text", "env", "match"),
    [
        ("listen: nowhere\n", {}, r"node.yaml: listen: .*expected HOST:PORT"),
        ("lissen: 127.0.0.1:1\n", {}, r"node.yaml: lissen: Extra inputs are not permitted"),
        ("device: tpu\n", {}, r"node.yaml: device: .*expected one of"),
        ("tls: {cert: a.pem}\n", {}, r"node.yaml: tls: .*cert and key must be given together"),
        (
            "",
            {"MOESAIC_NODE_MAX_MESSAGE_BYTES": "-1"},
            r"environment MOESAIC_NODE_MAX_MESSAGE_BYTES: max_message_bytes: .*greater than 0",
        ),
        ("- a\n", {}, r"node.yaml: expected a mapping"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, text: str, env: dict[str, str], match: str) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_node_config(path, env=env)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[3] / "nodes").glob("*.yaml")), ids=str
)
def test_example_node_configs_validate(path: Path) -> None:
    config = load_node_config(path, env={})
    assert config.node_id == path.stem
    assert config.listen.endswith(":8001")
