"""What a node runs on: a CPU host, a discrete NVIDIA GPU or a Jetson module.

:func:`discover_device` answers from the same places an operator would look::

    >>> from moesaic.runtime.devices import discover_device
    >>> device = discover_device("cpu")
    >>> device.kind, device.id
    ('cpu', 'cpu')

- Jetson: ``/etc/nv_tegra_release`` exists; the module name comes from the device-tree
  model (``/proc/device-tree/model``), memory from ``/proc/meminfo`` (shared with the GPU).
- Discrete NVIDIA GPU: NVML (package ``nvidia-ml-py``, imported lazily) gives the product
  name, memory and enforced power limit; the SM count comes from torch when it is installed.
- CPU: the model name and logical cores from ``/proc/cpuinfo``, memory from
  ``/proc/meminfo``, the package power limit from RAPL when readable.

Every filesystem read goes through ``root`` so tests point it at fixture trees.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DeviceInfo", "discover_device", "l4t_release", "parse_device_spec"]


@dataclass(frozen=True)
class DeviceInfo:
    """One device a node serves models on (the ``Device`` message of Node/Describe)."""

    kind: str  # "cpu" | "cuda" | "jetson"
    name: str
    memory_bytes: int
    power_limit_watts: float
    cores: int
    energy_source: str  # "nvml" | "jetson-ina3221" | "rapl" | "estimate"
    id: str  # "cpu", "cuda:0", "jetson"

    @property
    def index(self) -> int:
        """CUDA device index for ``cuda:N`` devices, else 0."""
        _, _, num = self.id.partition(":")
        return int(num) if num.isdigit() else 0


_SPEC = re.compile(r"^(auto|cpu|jetson|cuda(?::(\d+))?)$")


def parse_device_spec(spec: str) -> tuple[str, int]:
    """``(kind, index)`` of a device spec: ``auto``, ``cpu``, ``jetson``, ``cuda`` or ``cuda:N``."""
    match = _SPEC.match(spec.strip().lower())
    if not match:
        raise ValueError(f"device {spec!r}: expected one of 'auto', 'cpu', 'cuda', 'cuda:N', 'jetson'")
    kind = match.group(1).split(":")[0]
    return kind, int(match.group(2) or 0)


def discover_device(spec: str = "auto", *, root: Path = Path("/")) -> DeviceInfo:
    """Describe the device ``spec`` names; ``auto`` prefers Jetson, then CUDA GPU 0, then CPU.

    Raises ``ValueError`` for a malformed spec and ``LookupError`` when the named device is
    not present (e.g. ``cuda:1`` on a one-GPU host).
    """
    from moesaic.runtime.energy import detect_energy_source

    kind, index = parse_device_spec(spec)
    if kind == "auto":
        if _is_jetson(root):
            kind = "jetson"
        elif _nvml_device_count() > 0:
            kind = "cuda"
        else:
            kind = "cpu"
    if kind == "jetson":
        if not _is_jetson(root):
            raise LookupError(f"device {spec!r}: {root / 'etc/nv_tegra_release'} not found; not a Jetson")
        info = _jetson(root)
    elif kind == "cuda":
        info = _cuda(index)
    else:
        info = _cpu(root)
    source = detect_energy_source(info.kind, info.index, root=root)
    return DeviceInfo(**{**info.__dict__, "energy_source": source})


def l4t_release(*, root: Path = Path("/")) -> str | None:
    """Jetson Linux release, e.g. ``"R36.3.0"``, from ``/etc/nv_tegra_release``; None elsewhere."""
    text = _read(root / "etc/nv_tegra_release")
    if text is None:
        return None
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{match.group(1)}.{match.group(2)}" if match else None


# ---------------------------------------------------------------- per kind


def _is_jetson(root: Path) -> bool:
    return (root / "etc/nv_tegra_release").is_file()


def _jetson(root: Path) -> DeviceInfo:
    model = None
    for path in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        raw = _read(root / path)
        if raw:
            model = raw.strip("\x00").strip()
            break
    return DeviceInfo(
        kind="jetson",
        name=model or "NVIDIA Jetson",
        memory_bytes=_meminfo_total(root),
        power_limit_watts=0.0,
        cores=_cpu_cores(root),
        energy_source="estimate",
        id="jetson",
    )


def _cpu(root: Path) -> DeviceInfo:
    return DeviceInfo(
        kind="cpu",
        name=_cpu_model(root),
        memory_bytes=_meminfo_total(root),
        power_limit_watts=_rapl_power_limit_watts(root),
        cores=_cpu_cores(root),
        energy_source="estimate",
        id="cpu",
    )


def _cuda(index: int) -> DeviceInfo:
    nvml = _nvml()
    if nvml is None:
        raise LookupError(f"device 'cuda:{index}': NVML is not available (no NVIDIA driver or nvidia-ml-py)")
    count = nvml.nvmlDeviceGetCount()
    if index >= count:
        raise LookupError(f"device 'cuda:{index}': this host has {count} NVIDIA GPU(s)")
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    try:
        power_limit = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
    except nvml.NVMLError:
        power_limit = 0.0
    return DeviceInfo(
        kind="cuda",
        name=str(name),
        memory_bytes=memory,
        power_limit_watts=float(power_limit),
        cores=_cuda_sm_count(index),
        energy_source="estimate",
        id=f"cuda:{index}",
    )


def _cuda_sm_count(index: int) -> int:
    try:
        import torch
    except ImportError:
        return 0
    try:
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return int(torch.cuda.get_device_properties(index).multi_processor_count)
    except Exception:  # a broken CUDA install must not stop discovery
        return 0
    return 0


# ---------------------------------------------------------------- NVML


def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None when NVML is absent."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    return pynvml


def _nvml_device_count() -> int:
    nvml = _nvml()
    if nvml is None:
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception:
        return 0


# ---------------------------------------------------------------- /proc and /sys


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _cpu_model(root: Path) -> str:
    text = _read(root / "proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return "CPU"


def _cpu_cores(root: Path) -> int:
    text = _read(root / "proc/cpuinfo")
    if text:
        count = len(re.findall(r"^processor\s*:", text, re.MULTILINE))
        if count:
            return count
    return (os.cpu_count() or 0) if root == Path("/") else 0


def _meminfo_total(root: Path) -> int:
    text = _read(root / "proc/meminfo") or ""
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _rapl_power_limit_watts(root: Path) -> float:
    """Sum of the long-term power limits of the RAPL package zones; 0 when unreadable."""
    total = 0.0
    for zone in sorted((root / "sys/class/powercap").glob("intel-rapl:*")):
        if zone.name.count(":") != 1:
            continue
        limit = _read(zone / "constraint_0_power_limit_uw")
        if limit and limit.strip().isdigit():
            total += int(limit) / 1e6
    return total
