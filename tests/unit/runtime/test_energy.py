"""Energy meters: RAPL counters (wrap-around), INA3221 rails (sampled, integrated), estimates.

The sysfs readers run against copies of fixture trees whose values the tests change.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from moesaic.runtime import energy
from moesaic.runtime.devices import DeviceInfo
from moesaic.runtime.energy import (
    EstimateMeter,
    Ina3221Meter,
    RaplMeter,
    SampledPowerMeter,
    detect_energy_source,
    find_ina3221_rails,
    find_rapl_zones,
    open_meter,
)

SYSFS = Path(__file__).resolve().parents[2] / "fixtures" / "sysfs"
NANO_HWMON = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"


def _copy(tree: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(SYSFS / tree, tmp_path / tree))


def _write(path: Path, text: str) -> None:
    """Replace a file in one step, as sysfs values change: a reader never sees it empty."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)


def _device(kind: str, **kw: object) -> DeviceInfo:
    base: dict[str, object] = dict(
        kind=kind, name="x", memory_bytes=0, power_limit_watts=0.0, cores=2, energy_source="estimate", id=kind
    )
    base.update(kw)
    return DeviceInfo(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------- estimate


def test_estimate_meter_is_labelled_and_linear() -> None:
    now = [100.0]
    meter = EstimateMeter(12.5, clock=lambda: now[0])
    assert (meter.source, meter.measured) == ("estimate", False)
    now[0] += 4.0
    assert meter.joules() == pytest.approx(50.0)
    with pytest.raises(ValueError, match="watts"):
        EstimateMeter(-1)


# ---------------------------------------------------------------- RAPL


def test_rapl_zones_are_the_packages(tmp_path: Path) -> None:
    root = _copy("cpu_rapl", tmp_path)
    assert [z.name for z in find_rapl_zones(root=root)] == ["intel-rapl:0", "intel-rapl:1"]
    assert find_rapl_zones(root=SYSFS / "cpu_plain") == []
    (root / "sys/class/powercap/intel-rapl:1/energy_uj").unlink()  # unreadable zone: skipped
    assert [z.name for z in find_rapl_zones(root=root)] == ["intel-rapl:0"]


def test_rapl_sums_packages_and_unwraps(tmp_path: Path) -> None:
    root = _copy("cpu_rapl", tmp_path)
    pkg0 = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    pkg1 = root / "sys/class/powercap/intel-rapl:1/energy_uj"
    max_range = 262143328850
    pkg0.write_text(f"{max_range - 2_000_000}\n")  # 2 J before the wrap
    pkg1.write_text("1000000\n")
    with RaplMeter(find_rapl_zones(root=root), poll_interval_s=None) as meter:
        assert (meter.source, meter.measured) == ("rapl", True)
        assert meter.joules() == 0.0
        pkg0.write_text(f"{max_range - 500_000}\n")  # +1.5 J
        pkg1.write_text("3000000\n")  # +2 J
        assert meter.joules() == pytest.approx(3.5)
        pkg0.write_text("4500000\n")  # wrapped: +0.5 J to the top, +4.5 J after
        assert meter.joules() == pytest.approx(3.5 + 5.0)
        pkg0.write_text("4500000\n")
        assert meter.joules() == pytest.approx(8.5)  # no change, no phantom wrap


def test_rapl_poll_thread_catches_wraps_between_reads(tmp_path: Path) -> None:
    root = _copy("cpu_rapl", tmp_path)
    pkg0 = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    zones = [pkg0.parent]
    max_range = 262143328850
    pkg0.write_text(str(max_range - 1_000_000))
    meter = RaplMeter(zones, poll_interval_s=0.02)
    try:
        pkg0.write_text("1000000")  # first wrap: +2 J
        time.sleep(0.3)  # the poll thread reads it
        pkg0.write_text(str(max_range - 1_000_000))  # almost a full range more, no wrap
        time.sleep(0.3)
        pkg0.write_text("1000000")  # second wrap
        assert meter.joules() == pytest.approx((max_range + 2_000_000) / 1e6, rel=1e-9)
    finally:
        meter.close()


# ---------------------------------------------------------------- INA3221


def test_orin_nano_meters_vdd_in_only() -> None:
    rails = find_ina3221_rails(root=SYSFS / "jetson_orin_nano")
    assert [r.label for r in rails] == ["VDD_IN"]
    assert rails[0].watts() == pytest.approx(5.032 * 1.036)


def test_agx_orin_sums_labelled_rails_skipping_nc() -> None:
    rails = find_ina3221_rails(root=SYSFS / "jetson_agx_orin")
    assert [r.label for r in rails] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    total = sum(r.watts() for r in rails)
    assert total == pytest.approx(19.968 * 0.4 + 19.968 * 0.1 + 4.976 * 0.704 + 4.968 * 0.08)


def test_disabled_channel_is_skipped(tmp_path: Path) -> None:
    root = _copy("jetson_agx_orin", tmp_path)
    (root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3/in1_enable").write_text("0\n")
    assert "VDD_GPU_SOC" not in [r.label for r in find_ina3221_rails(root=root)]


def test_ina3221_integrates_changing_power(tmp_path: Path) -> None:
    root = _copy("jetson_orin_nano", tmp_path)
    hwmon = root / NANO_HWMON
    _write(hwmon / "in1_input", "5000\n")
    _write(hwmon / "curr1_input", "1000\n")  # 5 W
    meter = Ina3221Meter(find_ina3221_rails(root=root), interval_s=0.01)
    try:
        assert (meter.source, meter.measured) == ("jetson-ina3221", True)
        t0 = time.monotonic()
        time.sleep(0.4)
        _write(hwmon / "curr1_input", "3000\n")  # 15 W
        t1 = time.monotonic()
        time.sleep(0.4)
        joules = meter.joules()
        t2 = time.monotonic()
    finally:
        meter.close()
    expected = 5.0 * (t1 - t0) + 15.0 * (t2 - t1)
    assert joules == pytest.approx(expected, rel=0.15)
    frozen = meter.joules()
    time.sleep(0.05)
    assert meter.joules() == frozen >= joules  # closed: no more sampling


def test_sampled_meter_holds_the_last_value_when_a_read_fails() -> None:
    readings = iter([10.0, 10.0])

    def read() -> float:
        try:
            return next(readings)
        except StopIteration:
            raise OSError("gone") from None

    meter = SampledPowerMeter(read, source="jetson-ina3221", interval_s=0.01)
    try:
        time.sleep(0.2)
        assert meter.joules() == pytest.approx(10.0 * 0.2, rel=0.3)
    finally:
        meter.close()


# ---------------------------------------------------------------- choosing


def test_open_meter_picks_the_best_source(tmp_path: Path) -> None:
    with open_meter(_device("jetson"), root=SYSFS / "jetson_orin_nano") as meter:
        assert isinstance(meter, Ina3221Meter)
    with open_meter(_device("cpu"), root=_copy("cpu_rapl", tmp_path)) as meter:
        assert isinstance(meter, RaplMeter)
    with open_meter(_device("cpu", cores=4), root=SYSFS / "cpu_plain") as meter:
        assert isinstance(meter, EstimateMeter) and not meter.measured
        assert meter.watts == 16.0  # 4 W per core without a power limit
    with open_meter(_device("jetson"), root=SYSFS / "cpu_plain", estimate_watts=7.0) as meter:
        assert isinstance(meter, EstimateMeter) and meter.watts == 7.0


def test_detect_energy_source() -> None:
    assert detect_energy_source("jetson", root=SYSFS / "jetson_orin_nano") == "jetson-ina3221"
    assert detect_energy_source("cpu", root=SYSFS / "cpu_rapl") == "rapl"
    assert detect_energy_source("cpu", root=SYSFS / "cpu_plain") == "estimate"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
def test_nvml_counter_rises_under_load() -> None:
    import torch

    from moesaic.runtime.devices import discover_device

    device = discover_device("cuda:0")
    with open_meter(device) as meter:
        assert (meter.source, meter.measured) == ("nvml", True)
        a = torch.randn(4096, 4096, device="cuda")
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
        joules = meter.joules()
    assert joules > 5.0  # a busy datacenter GPU draws well over 5 W for a second


class FakeNvml:
    """The few NVML calls the meter makes, answering like a GPU shared by two processes
    (hardware this machine lacks; the meter's code is the real one)."""

    class NotFound(Exception):
        pass

    def __init__(self, samples: list[list[tuple[int, int, int]]]) -> None:
        self.batches = samples  # per call: (pid, timestamp us, smUtil)
        self.asked_since: list[int] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> object:
        return object()

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object) -> int:
        return 1000

    def nvmlDeviceGetProcessUtilization(self, handle: object, since_us: int) -> list[object]:
        self.asked_since.append(since_us)
        batch = self.batches.pop(0)
        if not batch:
            raise self.NotFound("no samples")
        return [SimpleNamespace(pid=p, timeStamp=t, smUtil=u) for p, t, u in batch]


def test_nvml_foreign_share_is_the_other_processes_sm_utilization(monkeypatch: pytest.MonkeyPatch) -> None:
    me, other = os.getpid(), os.getpid() + 1
    fake = FakeNvml(
        [
            [(other, 10, 80)],  # this process not seen yet (another PID namespace?): cannot tell
            [(me, 20, 30), (other, 20, 90)],
            [],  # no sample since the last call
            [(me, 30, 40), (other, 30, 0)],
        ]
    )
    monkeypatch.setattr(energy, "_nvml", lambda: fake)
    meter = energy.NvmlEnergyMeter(0)
    assert meter.foreign_share() is None
    assert meter.foreign_share() == pytest.approx(0.75)
    assert meter.foreign_share() is None
    assert meter.foreign_share() == 0.0
    assert fake.asked_since == [0, 10, 20, 20]  # each call asks only for newer samples
