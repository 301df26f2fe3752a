"""Energy meters: cumulative joules since the meter opened, measured where the hardware allows.

One interface, four sources, picked by :func:`open_meter` for a device:

============== ================================================================ ==========
source         how                                                              measured
============== ================================================================ ==========
nvml           NVML total-energy counter (mJ, Volta and newer); older cards:    yes
               ``nvmlDeviceGetPowerUsage`` sampled on a thread and integrated
jetson-ina3221 INA3221 rails in hwmon (``in*_input`` mV x ``curr*_input`` mA),  yes
               sampled on a thread and integrated; ``VDD_IN`` (module input)
               when present, else the sum of the rails
rapl           powercap ``energy_uj`` counters of the CPU packages, with        yes
               ``max_energy_range_uj`` wrap-around
estimate       a fixed wattage x elapsed time, labelled as an estimate          no
============== ================================================================ ==========

Example::

    >>> from moesaic.runtime.energy import EstimateMeter
    >>> with EstimateMeter(10.0) as meter:
    ...     meter.measured, meter.source
    (False, 'estimate')
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moesaic.runtime.devices import DeviceInfo

__all__ = [
    "ENERGY_SOURCES",
    "EnergyMeter",
    "EstimateMeter",
    "Ina3221Meter",
    "Ina3221Rail",
    "NvmlEnergyMeter",
    "RaplMeter",
    "SampledPowerMeter",
    "default_estimate_watts",
    "detect_energy_source",
    "find_ina3221_rails",
    "find_rapl_zones",
    "open_meter",
]

log = logging.getLogger(__name__)

ENERGY_SOURCES = ("nvml", "jetson-ina3221", "rapl", "estimate")


class EnergyMeter(ABC):
    """Cumulative energy since the meter opened. Close it (or use ``with``) to stop its thread."""

    source: str
    measured: bool

    @abstractmethod
    def joules(self) -> float:
        """Joules consumed since the meter opened."""

    def foreign_share(self) -> float | None:
        """Share of the device's activity since the last call caused by other processes (other
        nodes, a benchmark on the same GPU): 0 to 1, or None where the source cannot tell."""
        return None

    def close(self) -> None:  # noqa: B027 - most meters hold nothing to release
        """Stop sampling and release the hardware handle. Idempotent."""

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EstimateMeter(EnergyMeter):
    """``watts`` x elapsed seconds; every number from it is labelled ``estimate``."""

    source = "estimate"
    measured = False

    def __init__(self, watts: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if watts < 0:
            raise ValueError(f"watts: must be >= 0, got {watts}")
        self.watts = float(watts)
        self._clock = clock
        self._start = clock()

    def joules(self) -> float:
        return self.watts * (self._clock() - self._start)


class SampledPowerMeter(EnergyMeter):
    """Integrates a power reading (watts) sampled every ``interval_s`` on a daemon thread.

    :meth:`joules` takes one more sample first, so the integral always reaches "now". The
    trapezoid rule between samples; a failing read keeps the last value and is logged once.
    """

    def __init__(
        self,
        read_watts: Callable[[], float],
        *,
        source: str,
        interval_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        self.source = source
        self.measured = True
        self._read_watts = read_watts
        self._clock = clock
        self._interval = interval_s
        self._lock = threading.Lock()
        self._joules = 0.0
        self._last_watts = read_watts()
        self._last_time = clock()
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"energy-{source}", daemon=True)
        self._thread.start()

    @property
    def watts(self) -> float:
        """The latest power sample."""
        return self._last_watts

    def _sample(self) -> None:
        with self._lock:
            try:
                watts = self._read_watts()
            except (OSError, ValueError) as exc:
                if not self._warned:
                    log.warning("energy meter %s: read failed (%s); holding the last value", self.source, exc)
                    self._warned = True
                watts = self._last_watts
            now = self._clock()
            self._joules += 0.5 * (watts + self._last_watts) * (now - self._last_time)
            self._last_watts, self._last_time = watts, now

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def joules(self) -> float:
        if not self._stop.is_set():
            self._sample()
        with self._lock:
            return self._joules

    def close(self) -> None:
        if not self._stop.is_set():
            self._sample()
            self._stop.set()
            self._thread.join(timeout=5)


# ---------------------------------------------------------------- Jetson INA3221


@dataclass(frozen=True)
class Ina3221Rail:
    """One INA3221 channel: its label and the hwmon files of bus voltage and current."""

    label: str
    voltage_file: Path  # in{N}_input, mV
    current_file: Path  # curr{N}_input, mA

    def watts(self) -> float:
        millivolts = int(self.voltage_file.read_text().strip())
        milliamps = int(self.current_file.read_text().strip())
        return millivolts * milliamps / 1e6


# Channels that are not power rails: unconnected inputs and the driver's shunt-sum channel.
_NOT_RAILS = {"nc", "sum of shunt voltages"}


def find_ina3221_rails(*, root: Path = Path("/")) -> list[Ina3221Rail]:
    """The rails to meter: ``VDD_IN`` (whole module) when present, else every labelled rail.

    Looks in ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*`` (Jetson Linux 34+, the Orin
    layout) and, failing that, in any ``/sys/class/hwmon/hwmon*`` whose ``name`` is ina3221.
    """
    dirs = sorted((root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*"))
    if not dirs:
        dirs = [
            d
            for d in sorted((root / "sys/class/hwmon").glob("hwmon*"))
            if _read(d / "name").strip() == "ina3221"
        ]
    rails: list[Ina3221Rail] = []
    for hwmon in dirs:
        for channel in (1, 2, 3):
            label = _read(hwmon / f"in{channel}_label").strip()
            if (
                not label
                or label.lower() in _NOT_RAILS
                or _read(hwmon / f"in{channel}_enable").strip() == "0"
            ):
                continue
            rail = Ina3221Rail(label, hwmon / f"in{channel}_input", hwmon / f"curr{channel}_input")
            try:
                rail.watts()
            except (OSError, ValueError):
                continue
            rails.append(rail)
    total = [r for r in rails if r.label.upper() == "VDD_IN"]
    return total[:1] or rails


class Ina3221Meter(SampledPowerMeter):
    """Jetson power rails (INA3221 via hwmon), sampled and integrated."""

    def __init__(self, rails: list[Ina3221Rail], *, interval_s: float = 0.05) -> None:
        if not rails:
            raise ValueError("rails: no INA3221 rail to meter")
        self.rails = tuple(rails)
        super().__init__(self._read, source="jetson-ina3221", interval_s=interval_s)

    def _read(self) -> float:
        return sum(rail.watts() for rail in self.rails)


# ---------------------------------------------------------------- RAPL


def find_rapl_zones(*, root: Path = Path("/")) -> list[Path]:
    """Readable top-level RAPL zones (``intel-rapl:N``; packages, not their sub-zones).

    ``psys`` (whole platform, on some laptops) overlaps the packages and is skipped when
    package zones exist. ``energy_uj`` is root-only on most current kernels.
    """
    zones = []
    for zone in sorted((root / "sys/class/powercap").glob("intel-rapl:*")):
        if zone.name.count(":") != 1:
            continue
        try:
            int((zone / "energy_uj").read_text().strip())
        except (OSError, ValueError):
            continue
        zones.append(zone)
    packages = [z for z in zones if _read(z / "name").strip().startswith("package")]
    return packages or zones


class RaplMeter(EnergyMeter):
    """Sum of RAPL ``energy_uj`` counters, unwrapping each at its ``max_energy_range_uj``.

    A counter wraps after ``max_energy_range_uj`` (about 262 kJ, minutes to an hour at full
    load); one wrap between two reads is undone. A thread reads every ``poll_interval_s`` so
    long idle gaps between :meth:`joules` calls never hide a second wrap (None: no thread).
    """

    source = "rapl"
    measured = True

    def __init__(self, zones: list[Path], *, poll_interval_s: float | None = 10.0) -> None:
        if not zones:
            raise ValueError("zones: no RAPL zone to meter")
        self.zones = tuple(zones)
        self._ranges = [int((z / "max_energy_range_uj").read_text().strip()) for z in zones]
        self._last = [self._read(z) for z in zones]
        self._total_uj = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll_interval_s is not None:
            self._thread = threading.Thread(target=self._poll, args=(poll_interval_s,), daemon=True)
            self._thread.start()

    @staticmethod
    def _read(zone: Path) -> int:
        return int((zone / "energy_uj").read_text().strip())

    def _update(self) -> None:
        with self._lock:
            for i, zone in enumerate(self.zones):
                now = self._read(zone)
                delta = now - self._last[i]
                if delta < 0:  # the counter wrapped at max_energy_range_uj
                    delta += self._ranges[i]
                self._total_uj += delta
                self._last[i] = now

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._update()
            except (OSError, ValueError) as exc:
                log.warning("RAPL read failed: %s", exc)

    def joules(self) -> float:
        self._update()
        return self._total_uj / 1e6

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# ---------------------------------------------------------------- NVML


def _nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


class NvmlEnergyMeter(EnergyMeter):
    """NVML total-energy counter of one GPU (``nvmlDeviceGetTotalEnergyConsumption``, mJ)."""

    source = "nvml"
    measured = True

    def __init__(self, index: int = 0) -> None:
        nvml = _nvml()
        if nvml is None:
            raise LookupError("NVML is not available (no NVIDIA driver or nvidia-ml-py)")
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self._start_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        self._closed = False
        self._pid = os.getpid()
        self._seen_us = 0  # newest per-process utilization sample read so far
        self._seen_self = False

    def joules(self) -> float:
        return (int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) - self._start_mj) / 1000.0

    def foreign_share(self) -> float | None:
        """Other processes' share of the SM utilization NVML sampled per process since the last
        call (``nvmlDeviceGetProcessUtilization``). None when nothing ran, when NVML keeps no
        such samples, or while this process has not appeared in them (in another PID namespace
        its own PID never does, and the share cannot be told)."""
        try:
            samples = self._nvml.nvmlDeviceGetProcessUtilization(self._handle, self._seen_us)
        except Exception:  # NVML_ERROR_NOT_FOUND: no sample since the last call
            return None
        own = other = 0
        for sample in samples:
            self._seen_us = max(self._seen_us, int(sample.timeStamp))
            if sample.pid == self._pid:
                own += sample.smUtil
                self._seen_self = self._seen_self or sample.smUtil > 0
            else:
                other += sample.smUtil
        if not self._seen_self or own + other == 0:
            return None
        return other / (own + other)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._nvml.nvmlShutdown()


def _open_nvml(index: int, interval_s: float) -> EnergyMeter:
    """The energy counter where the card has one, else sampled board power (both "nvml")."""
    try:
        return NvmlEnergyMeter(index)
    except LookupError:
        raise
    except Exception as exc:  # NVMLError_NotSupported on pre-Volta cards
        log.info("NVML energy counter unavailable on GPU %d (%s); sampling power instead", index, exc)
    nvml = _nvml()
    assert nvml is not None
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return SampledPowerMeter(
        lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, source="nvml", interval_s=interval_s
    )


# ---------------------------------------------------------------- choosing


def detect_energy_source(kind: str, index: int = 0, *, root: Path = Path("/")) -> str:
    """The source :func:`open_meter` would use for a device of ``kind`` (without opening it)."""
    if kind == "cuda":
        nvml = _nvml()
        if nvml is not None:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                except nvml.NVMLError:
                    nvml.nvmlDeviceGetPowerUsage(handle)
                return "nvml"
            except Exception:
                pass
    elif kind == "jetson":
        if find_ina3221_rails(root=root):
            return "jetson-ina3221"
    elif kind == "cpu" and find_rapl_zones(root=root):
        return "rapl"
    return "estimate"


def default_estimate_watts(device: DeviceInfo) -> float:
    """A rough active-power guess for the estimate meter when nothing can be measured.

    Half the device's power limit when known, else 4 W per CPU core (at most 65 W) for CPUs,
    10 W for a Jetson and 70 W for a GPU. Numbers from it are always labelled ``estimate``.
    """
    if device.power_limit_watts > 0:
        return device.power_limit_watts / 2
    if device.kind == "cpu":
        return float(min(65, 4 * max(device.cores, 1)))
    return 10.0 if device.kind == "jetson" else 70.0


def open_meter(
    device: DeviceInfo,
    *,
    root: Path = Path("/"),
    interval_s: float = 0.05,
    estimate_watts: float | None = None,
) -> EnergyMeter:
    """The best meter available for ``device``; falls back to a labelled :class:`EstimateMeter`."""
    try:
        if device.kind == "cuda":
            return _open_nvml(device.index, interval_s)
        if device.kind == "jetson":
            rails = find_ina3221_rails(root=root)
            if rails:
                return Ina3221Meter(rails, interval_s=interval_s)
        elif device.kind == "cpu":
            zones = find_rapl_zones(root=root)
            if zones:
                return RaplMeter(zones)
    except Exception as exc:  # fall back, but say so
        log.warning("no measured energy for %s (%s); using an estimate", device.id, exc)
    watts = estimate_watts if estimate_watts is not None else default_estimate_watts(device)
    return EstimateMeter(watts)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
