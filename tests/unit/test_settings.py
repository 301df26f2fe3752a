"""The one settings loader (moesaic.config.load_settings) behind every role's config.

Precedence: command line > MOESAIC_<ROLE>_* environment > $CREDENTIALS_DIRECTORY > YAML file
> defaults; unknown keys fail at every level with an error naming the source and the field.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from moesaic.config import load_settings
from moesaic.coordinator.config import load_fleet, parse_fleet
from moesaic.dashboard.config import load_dashboard_config
from moesaic.ingest.config import IngestConfig, load_config
from moesaic.nodes.config import NodeConfig, load_node_config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """A systemd-like credentials directory."""
    folder = tmp_path / "credentials"
    folder.mkdir()
    return folder


def test_each_source_wins_over_the_next(tmp_path: Path, credentials: Path) -> None:
    yaml = write(
        tmp_path / "node.yaml",
        "node_id: from-file\nlisten: 127.0.0.1:1001\nmax_workers: 2\ngrace_seconds: 3\nhang_timeout_s: 7\n",
    )
    write(credentials / "node_id", "from-credential\n")
    write(credentials / "listen", "127.0.0.1:1002")
    write(credentials / "device", "cpu")
    env = {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "MOESAIC_NODE_LISTEN": "127.0.0.1:1003",
        "MOESAIC_NODE_MAX_WORKERS": "5",
    }
    config = load_node_config(yaml, env=env, overrides={"max_workers": 9, "grace_seconds": None})
    assert config.max_workers == 9  # command line over environment
    assert config.listen == "127.0.0.1:1003"  # environment over credential
    assert config.node_id == "from-credential"  # credential over file (final newline dropped)
    assert config.grace_seconds == 3  # file over default; None on the command line = not given
    assert config.hang_timeout_s == 7
    assert config.watch_interval_s == NodeConfig.model_fields["watch_interval_s"].default  # default


def test_nested_fields_use_a_double_underscore(tmp_path: Path, credentials: Path) -> None:
    yaml = write(tmp_path / "node.yaml", "tls: {cert: file.pem, key: file.key}\n")
    write(credentials / "tls__key", "-----BEGIN PRIVATE KEY-----\n")
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "MOESAIC_NODE_TLS__CLIENT_CA": "ca.pem"}
    config = load_node_config(yaml, env=env)
    assert config.tls is not None
    assert config.tls.cert == Path("file.pem")  # the file's, beside the others
    assert config.tls.key == credentials / "tls__key"  # a path field gets the credential's path
    assert config.tls.client_ca == Path("ca.pem")


def test_secrets_come_from_the_credentials_directory(tmp_path: Path, credentials: Path) -> None:
    yaml = write(tmp_path / "ingest.yaml", "username: bridge\npassword: in-the-file\n")
    write(credentials / "password", "s3cret\n")
    write(credentials / "coordinator_tls__ca", "PEM")
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    config = load_config(yaml, env=env)
    assert config.resolve_password() == "s3cret"
    assert (
        config.coordinator_tls is not None
        and config.coordinator_tls.ca == credentials / "coordinator_tls__ca"
    )
    # without the directory the file's value stands
    assert load_config(yaml, env={}).resolve_password() == "in-the-file"


def test_documented_mqtt_aliases_and_the_roles_own_variable(tmp_path: Path) -> None:
    env = {"MOESAIC_MQTT_USERNAME": "alias-user", "MOESAIC_MQTT_PASSWORD": "alias-pass"}
    config = load_config(env=env)
    assert (config.resolve_username(), config.resolve_password()) == ("alias-user", "alias-pass")
    config = load_config(env={**env, "MOESAIC_INGEST_PASSWORD": "own"})
    assert config.resolve_password() == "own"
    dashboard = load_dashboard_config(env=env)
    assert dashboard.mqtt.username == "alias-user" and dashboard.mqtt.password == "alias-pass"


def test_complex_values_in_the_environment_are_yaml(tmp_path: Path) -> None:
    env = {
        "MOESAIC_INGEST_DEFAULTS__CAMERA": "{tasks: [detection], budget: {latency_ms: 80}}",
        "MOESAIC_INGEST_SENSORS_FILTER": '["roof", "gate"]',
    }
    config = load_config(env=env)
    assert config.defaults.camera.budget.latency_ms == 80
    assert config.sensors_filter == ("roof", "gate")


@pytest.mark.parametrize(
    ("role", "name", "text", "message"),
    [
        (
            "node",
            "node.yaml",
            "tls: {cert: a, key: b, keyy: c}\n",
            "tls.keyy: Extra inputs are not permitted",
        ),
        (
            "coordinator",
            "coordinator.yaml",
            "tasks:\n  detection: {budgett: {latency_ms: 5}}\n",
            "tasks.detection.budgett: Extra inputs are not permitted",
        ),
        (
            "ingest",
            "ingest.yaml",
            "defaults:\n  camera: {tasks: [detection], budget: {latency_ms: 5, energy: 1}}\n",
            "defaults.camera.budget.energy: Extra inputs are not permitted",
        ),
        (
            "dashboard",
            "dashboard.yaml",
            "mqtt: {brokre: mqtt://x:1}\n",
            "mqtt.brokre: Extra inputs are not permitted",
        ),
    ],
)
def test_a_wrong_key_in_any_roles_yaml_names_the_file_and_field(
    tmp_path: Path, role: str, name: str, text: str, message: str
) -> None:
    path = write(tmp_path / name, text)
    loaders = {
        "node": lambda: load_node_config(path, env={}),
        "coordinator": lambda: load_fleet(path, env={}),
        "ingest": lambda: load_config(path, env={}),
        "dashboard": lambda: load_dashboard_config(path, env={}),
    }
    with pytest.raises(ValueError) as info:
        loaders[role]()
    assert str(info.value) == f"{path}: {message}"  # one line: the file, the field, the problem


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MOESAIC_NODE_LISTENN": "x"}, "environment MOESAIC_NODE_LISTENN: node has no setting 'listenn'"),
        (
            {"MOESAIC_NODE_TLS": "{cert: ["},
            "environment MOESAIC_NODE_TLS: tls: Input should be a valid dictionary",
        ),
        ({"MOESAIC_NODE_TLS__CERTT": "x"}, "environment MOESAIC_NODE_TLS__CERTT: tls.certt: Extra inputs"),
        (
            {"MOESAIC_NODE_MAX_WORKERS": "0"},
            "environment MOESAIC_NODE_MAX_WORKERS: max_workers: Input should be",
        ),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_node_config(env=env)


def test_a_mapping_that_is_not_yaml_is_named() -> None:
    env = {"MOESAIC_COORDINATOR_DEFAULT_BUDGET": "{latency_ms: ["}
    with pytest.raises(
        ValueError, match=r'MOESAIC_COORDINATOR_\*.*"default_budget".*line 1 column 15: expected'
    ):
        parse_fleet({}, env=env)


def test_a_bad_credential_is_named(tmp_path: Path, credentials: Path) -> None:
    write(credentials / "listen", "nowhere")
    with pytest.raises(
        ValueError, match=rf"credential {credentials / 'listen'}: listen: .*expected HOST:PORT"
    ):
        load_node_config(env={"CREDENTIALS_DIRECTORY": str(credentials)})


def test_coordinator_variables_and_credentials_address_the_coordinator_section(
    tmp_path: Path, credentials: Path
) -> None:
    path = write(
        tmp_path / "fleet.yaml", "coordinator: {overhead_ms: 3, tls: {cert: c.pem, key: file.key}}\n"
    )
    write(credentials / "tls__key", "PEM")
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "MOESAIC_COORDINATOR_DEFAULT_BUDGET__ENERGY_MJ": "50"}
    config = load_fleet(path, env=env).coordinator
    assert config.overhead_ms == 3 and config.default_budget.energy_mj == 50
    assert config.tls is not None and config.tls.key == credentials / "tls__key"


def test_the_dashboard_takes_the_bridges_broker_model_and_its_old_keys_for_one_release(
    tmp_path: Path,
) -> None:
    new = write(
        tmp_path / "new.yaml",
        "mqtt: {broker: mqtts://b:8883, username: u, tls: {ca_file: ca.pem}}\n",
    )
    old = write(tmp_path / "old.yaml", "broker: mqtts://b:8883\nusername: u\nmqtt_tls: {ca_file: ca.pem}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = load_dashboard_config(new, env={})
    with pytest.warns(FutureWarning, match=r"broker, username, mqtt_tls at the top level.*mqtt\.tls"):
        assert load_dashboard_config(old, env={}).mqtt == expected.mqtt
    bridge = expected.mqtt_config()
    assert (
        isinstance(bridge, IngestConfig)
        and bridge.tls == expected.mqtt.tls
        and bridge.component == "dashboard"
    )


def test_no_file_and_decoded_data() -> None:
    assert load_settings(NodeConfig, role="node", env={}).listen == "127.0.0.1:8001"
    with pytest.raises(ValueError, match="demo config: expected a mapping at the top level"):
        load_settings(NodeConfig, role="node", data=["x"], source="demo config", env={})  # type: ignore[arg-type]
