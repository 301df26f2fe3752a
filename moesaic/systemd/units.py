"""systemd unit files of a moesaic deployment: one node per config, the coordinator, the bridge.

:func:`render_units` returns ``{file name: text}``; ``moesaic install-units`` writes them.
Every service is ``Type=notify`` (READY once serving, a watchdog fed from the serving loop),
restarts on failure, runs as a dynamic user (or ``user``) in a read-only file system, and
reads its secrets from systemd credentials (``LoadCredential=``, files under ``$CREDENTIALS_DIRECTORY``).

>>> units = render_units(UnitsConfig(executable=Path("/opt/moesaic/bin/moesaic")))
>>> sorted(units)
['moesaic-coordinator.service', 'moesaic-ingest.service', 'moesaic-node@.service']
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moesaic.config import load_model

__all__ = ["UNIT_NAMES", "UnitsConfig", "load_units_config", "render_units", "unreachable_paths"]

UNIT_NAMES = ("moesaic-node@.service", "moesaic-coordinator.service", "moesaic-ingest.service")


class UnitsConfig(BaseModel):
    """How the units run moesaic: where the binary and the configs are, as whom, which secrets."""

    model_config = ConfigDict(extra="forbid")

    executable: Path = Field(
        default=Path("/opt/moesaic/.venv/bin/moesaic"), description="absolute path of the moesaic command"
    )
    config_dir: Path = Field(
        default=Path("/etc/moesaic"),
        description="holds fleet.yaml, ingest.yaml and nodes/NAME.yaml (moesaic-node@NAME)",
    )
    coordinator_listen: str = Field(default="127.0.0.1:8500", description="HOST:PORT of the coordinator")
    user: str | None = Field(default=None, description="run as this existing user; a DynamicUser when unset")
    watchdog_sec: int = Field(default=30, ge=2, description="WatchdogSec= (services ping every half of it)")
    node_start_timeout_sec: int = Field(default=600, ge=10, description="model loading may take this long")
    credentials: dict[str, dict[str, Path]] = Field(
        default_factory=dict,
        description="per unit kind (node, coordinator, ingest): credential name -> file, as LoadCredential=",
    )
    environment: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="per unit kind: extra Environment= variables"
    )
    allow_ips: list[str] = Field(
        default_factory=lambda: ["localhost", "link-local", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
        description="IPAddressAllow= of every unit (everything else is denied): the networks that "
        "hold the fleet's nodes, coordinator, broker and clients; [] = no IP restriction",
    )
    node_devices: list[str] = Field(
        default_factory=lambda: [
            "char-nvidia-frontend rw",
            "char-nvidia-uvm rw",
            "char-nvidia-caps rw",
            "char-nvidia-caps-imex-channels rw",
        ],
        description="DeviceAllow= of nodes (DevicePolicy=closed): the NVIDIA GPU devices by default; a "
        "Jetson needs e.g. char-nvmap rw, char-nvhost-ctrl rw, char-nvhost-gpu rw; [] = any device",
    )

    @field_validator("executable", "config_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(path)!r}")
        return path

    @field_validator("credentials", "environment")
    @classmethod
    def _kinds(cls, value: dict[str, object]) -> dict[str, object]:
        unknown = set(value) - {"node", "coordinator", "ingest"}
        if unknown:
            raise ValueError(f"unknown unit kind(s) {sorted(unknown)}; expected node, coordinator, ingest")
        return value


def load_units_config(path: Path | None = None, **overrides: object) -> UnitsConfig:
    """Read ``path`` (YAML) and apply non-None ``overrides``; ``ValueError`` naming file and field."""
    return load_model(UnitsConfig, path, what="units config", **overrides)


_PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))
_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))


def _protect_home(config: UnitsConfig) -> str:
    return "read-only" if str(config.executable).startswith(("/home/", "/root/")) else "yes"


def unreachable_paths(config: UnitsConfig) -> list[str]:
    """Warnings, one per path the units name that the service cannot reach in its sandbox:
    anything under /tmp or /var/tmp (``PrivateTmp=yes`` gives the service its own, empty /tmp)
    and, with ``ProtectHome=yes``, anything under /home, /root or /run/user."""
    paths = [("ExecStart", config.executable), ("config_dir", config.config_dir)]
    paths += [
        (f"credential {name} ({kind})", path)
        for kind, items in config.credentials.items()
        for name, path in items.items()
    ]
    warnings = []
    for what, path in paths:
        tmp = next((t for t in _PRIVATE_TMP if path == t or t in path.parents), None)
        if tmp is not None:
            warnings.append(
                f"{what} {path} is under {tmp}: the units "
                "set PrivateTmp=yes, so the service sees its own empty /tmp and cannot reach it (a missing "
                "ExecStart fails with status 203/EXEC); install or copy it elsewhere, e.g. /opt/moesaic or "
                "/etc/moesaic"
            )
        elif _protect_home(config) == "yes" and any(home in path.parents for home in _HOMES):
            warnings.append(
                f"{what} {path} is under a home directory: the units set ProtectHome=yes, so the service "
                "cannot read it; move it to e.g. /opt/moesaic or /etc/moesaic"
            )
    return warnings


def _hardening(config: UnitsConfig, *, node: bool) -> str:
    """Sandboxing of one unit. Nodes differ: GPUs and Jetson rails need /dev, sysfs and /proc, and
    CUDA and ONNX Runtime's JIT need writable executable memory (no MemoryDenyWriteExecute)."""
    who = f"User={config.user}\nGroup={config.user}" if config.user else "DynamicUser=yes"
    protect_home = _protect_home(config)
    if node:
        specific = ["# GPUs and Jetson power rails need /dev and sysfs; only their devices are allowed."]
        specific.append("PrivateDevices=no")
        if config.node_devices:
            specific.append("DevicePolicy=closed")
            specific += [f"DeviceAllow={device}" for device in config.node_devices]
        specific.append("ProtectProc=invisible")
        specific.append("# CUDA and JIT compilers map writable code: no MemoryDenyWriteExecute=.")
    else:
        specific = [
            "PrivateDevices=yes",
            "ProtectClock=yes",  # its implied DeviceAllow= would hide a node's GPUs
            "ProtectProc=invisible",
            "ProcSubset=pid",
            "PrivateUsers=yes",
            "MemoryDenyWriteExecute=yes",
        ]
    if config.allow_ips:
        specific += ["IPAddressDeny=any", f"IPAddressAllow={' '.join(config.allow_ips)}"]
    lines = "\n".join(specific)
    return f"""{who}
StateDirectory=moesaic
CacheDirectory=moesaic
RuntimeDirectory=%N
WorkingDirectory=/var/lib/moesaic
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateMounts=yes
{lines}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
AmbientCapabilities="""


def _extras(config: UnitsConfig, kind: str) -> str:
    lines = [
        f"LoadCredential={name}:{path}" for name, path in sorted(config.credentials.get(kind, {}).items())
    ]
    lines += [f'Environment="{k}={v}"' for k, v in sorted(config.environment.get(kind, {}).items())]
    return "\n".join(lines) + ("\n" if lines else "")


_COMMON = """Type=notify
NotifyAccess=main
WatchdogSec={watchdog}
Restart=on-failure
RestartSec=2
TimeoutStopSec=30
KillMode=mixed
Environment=PYTHONUNBUFFERED=1"""


def render_units(config: UnitsConfig) -> dict[str, str]:
    """The text of every unit file for ``config``."""
    exe, cfg = config.executable, config.config_dir
    common = _COMMON.format(watchdog=config.watchdog_sec)
    header = (
        "# Generated by `moesaic install-units`; edit the units config and re-run rather than this file.\n"
    )
    node = f"""{header}[Unit]
Description=moesaic node %i: perception experts over gRPC (KServe v2)
Documentation=man:systemd.service(5)
After=network-online.target
Wants=network-online.target

[Service]
{common}
TimeoutStartSec={config.node_start_timeout_sec}
ExecStart={exe} node --config {cfg}/nodes/%i.yaml --node-id %i
# Secrets (e.g. the TLS key) as credentials: LoadCredential=tls-key:/etc/moesaic/node.key and
# Environment=MOESAIC_NODE_TLS__KEY=%d/tls-key in the units config.
{_extras(config, "node")}{_hardening(config, node=True)}

[Install]
WantedBy=multi-user.target
"""
    coordinator = f"""{header}[Unit]
Description=moesaic coordinator: expert selection under latency and energy budgets (gRPC)
Documentation=man:systemd.service(5)
After=network-online.target
Wants=network-online.target

[Service]
{common}
TimeoutStartSec=120
ExecStart={exe} coordinator --config {cfg}/fleet.yaml --listen {config.coordinator_listen}
{_extras(config, "coordinator")}{_hardening(config, node=False)}

[Install]
WantedBy=multi-user.target
"""
    ingest = f"""{header}[Unit]
Description=moesaic ingest: MQTT sensor frames to the coordinator, results back to MQTT
Documentation=man:systemd.service(5)
After=network-online.target moesaic-coordinator.service
Wants=network-online.target

[Service]
{common}
TimeoutStartSec=120
ExecStart={exe} ingest --config {cfg}/ingest.yaml
# The broker password: password_credential: mqtt-password in ingest.yaml and
# LoadCredential=mqtt-password:/etc/moesaic/credentials/mqtt-password here.
{_extras(config, "ingest")}{_hardening(config, node=False)}

[Install]
WantedBy=multi-user.target
"""
    return dict(zip(UNIT_NAMES, (node, coordinator, ingest), strict=True))
