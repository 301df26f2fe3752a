"""Shared-memory regions: registering, reading and writing in place, and every refusal; CUDA
regions refused clearly on a host without a CUDA driver."""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from moesaic.errors import FailedPrecondition, InvalidInput, NotFound
from moesaic.nodes.shm import CUDA_EXTENSION, EXTENSION, CudaRegion, RegionRef, SharedMemory
from moesaic.runtime import cuda_ipc

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")


@pytest.fixture
def segment() -> Iterator[shared_memory.SharedMemory]:
    seg = shared_memory.SharedMemory(create=True, size=64)
    try:
        yield seg
    finally:
        seg.close()
        seg.unlink()


def test_read_and_write_in_place(segment: shared_memory.SharedMemory) -> None:
    regions = SharedMemory()
    regions.register("r", "/" + segment.name, 16, 32)
    np.frombuffer(segment.buf, np.float32)[4:8] = [1, 2, 3, 4]  # bytes 16..31: the region's start
    view = np.frombuffer(regions.read(RegionRef("r", 0, 16), "input 'x'"), np.float32)
    assert view.tolist() == [1, 2, 3, 4]
    regions.write(RegionRef("r", 16, 16), np.array([5, 6, 7, 8], np.float32), "output 'y'")
    assert np.frombuffer(segment.buf, np.float32)[8:12].tolist() == [5, 6, 7, 8]
    assert [(r.name, r.offset, r.byte_size) for r in regions.status()] == [("r", 16, 32)]
    del view
    regions.close()
    assert regions.status() == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, key: s.register("r", "/../x", 0, 8), "expected a name like"),
        (lambda s, key: s.register("r", "/moesaic-no-such-object", 0, 8), "cannot open"),
        (lambda s, key: s.register("r", key, 60, 8), "does not fit the 64 bytes"),
        (lambda s, key: s.register("", key, 0, 8), "a name is needed"),
        (lambda s, key: s.read(RegionRef("nope", 0, 4), "input 'x'"), "'nope' is not registered"),
        (lambda s, key: s.read(RegionRef("ok", 4, 8), "input 'x'"), "exceed region 'ok'"),
        (lambda s, key: s.write(RegionRef("ok", 0, 4), np.zeros(2, np.float32), "output 'y'"), "do not fit"),
        (lambda s, key: s.register("ok", key, 0, 8), "already registered"),
    ],
)
def test_refusals_are_invalid_input(segment: shared_memory.SharedMemory, call: object, message: str) -> None:
    regions = SharedMemory()
    regions.register("ok", "/" + segment.name, 0, 8)
    with pytest.raises(InvalidInput, match=message):
        call(regions, "/" + segment.name)  # type: ignore[operator]
    with pytest.raises(NotFound):
        regions.status("nope")
    regions.close()


def test_system_and_cuda_regions_are_listed_apart(segment: shared_memory.SharedMemory) -> None:
    regions = SharedMemory()
    regions.register("r", "/" + segment.name, 0, 8)
    assert regions.status("", CudaRegion) == []
    with pytest.raises(NotFound):
        regions.status("r", CudaRegion)
    regions.unregister("", CudaRegion)  # forgets CUDA regions only
    assert [r.name for r in regions.status()] == ["r"]
    regions.close()


def test_a_cuda_handle_of_the_wrong_size_is_the_clients_error() -> None:
    with pytest.raises(InvalidInput, match="expected the 64 bytes of a cudaIpcMemHandle_t, got 3"):
        SharedMemory().register_cuda("g", b"abc", 0, 16)


@pytest.mark.skipif(cuda_ipc.available(), reason="this host has a CUDA driver (covered in tests/gpu)")
def test_without_a_cuda_driver_cuda_regions_are_refused_by_name() -> None:
    regions = SharedMemory()
    with pytest.raises(FailedPrecondition, match="CUDA shared memory needs a CUDA device: no CUDA driver"):
        regions.register_cuda("g", bytes(64), 0, 16)
    assert regions.status("", CudaRegion) == []
    assert SharedMemory.extensions() == [EXTENSION]
    assert CUDA_EXTENSION not in SharedMemory.extensions()
