"""Device discovery against fixture trees copying real /proc, /sys and /etc layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesaic.runtime.devices import DeviceInfo, discover_device, l4t_release, parse_device_spec

SYSFS = Path(__file__).resolve().parents[2] / "fixtures" / "sysfs"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("auto", ("auto", 0)),
        ("cpu", ("cpu", 0)),
        ("cuda", ("cuda", 0)),
        ("cuda:3", ("cuda", 3)),
        ("Jetson", ("jetson", 0)),
    ],
)
def test_parse_device_spec(spec: str, expected: tuple[str, int]) -> None:
    assert parse_device_spec(spec) == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cpu:0", ""])
def test_bad_device_spec_names_it(spec: str) -> None:
    with pytest.raises(ValueError, match="device"):
        parse_device_spec(spec)


def test_jetson_orin_nano() -> None:
    device = discover_device("jetson", root=SYSFS / "jetson_orin_nano")
    assert device == DeviceInfo(
        kind="jetson",
        name="NVIDIA Jetson Orin Nano Developer Kit",
        memory_bytes=7802624 * 1024,
        power_limit_watts=0.0,
        cores=6,
        energy_source="jetson-ina3221",
        id="jetson",
    )
    assert l4t_release(root=SYSFS / "jetson_orin_nano") == "R36.3.0"


def test_auto_prefers_jetson() -> None:
    assert (
        discover_device("auto", root=SYSFS / "jetson_agx_orin").name == "NVIDIA Jetson AGX Orin Developer Kit"
    )


def test_cpu_with_rapl() -> None:
    device = discover_device("cpu", root=SYSFS / "cpu_rapl")
    assert device.kind == "cpu" and device.id == "cpu"
    assert device.name == "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz"
    assert device.cores == 4
    assert device.memory_bytes == 16303528 * 1024
    assert device.power_limit_watts == pytest.approx(250.0)  # two packages x 125 W long-term
    assert device.energy_source == "rapl"


def test_cpu_without_powercap_is_estimated() -> None:
    device = discover_device("cpu", root=SYSFS / "cpu_plain")
    assert (device.name, device.cores, device.energy_source) == ("AMD EPYC 7B13", 2, "estimate")
    assert device.power_limit_watts == 0.0
    assert l4t_release(root=SYSFS / "cpu_plain") is None


def test_jetson_spec_on_a_non_jetson_host() -> None:
    with pytest.raises(LookupError, match="nv_tegra_release"):
        discover_device("jetson", root=SYSFS / "cpu_plain")


def test_missing_gpu_index_is_a_lookup_error() -> None:
    with pytest.raises(LookupError, match="cuda:97"):
        discover_device("cuda:97", root=SYSFS / "cpu_plain")


def test_this_host() -> None:
    device = discover_device("cpu")
    assert device.kind == "cpu" and device.cores >= 1 and device.memory_bytes > 0
    assert device.energy_source in ("rapl", "estimate")


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
def test_nvml_gpu() -> None:
    device = discover_device("cuda:0")
    assert device.kind == "cuda" and device.id == "cuda:0"
    assert device.name and device.memory_bytes > 1 << 30
    assert device.power_limit_watts > 0 and device.cores > 0
    assert device.energy_source == "nvml"
    assert discover_device("auto").kind == "cuda"
