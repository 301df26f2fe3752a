"""System shared-memory regions: registering, reading and writing in place, and every refusal."""

from __future__ import annotations

from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from moesaic.errors import InvalidInput, NotFound
from moesaic.nodes.shm import RegionRef, SystemSharedMemory

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
    regions = SystemSharedMemory()
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
    regions = SystemSharedMemory()
    regions.register("ok", "/" + segment.name, 0, 8)
    with pytest.raises(InvalidInput, match=message):
        call(regions, "/" + segment.name)  # type: ignore[operator]
    with pytest.raises(NotFound):
        regions.status("nope")
    regions.close()
