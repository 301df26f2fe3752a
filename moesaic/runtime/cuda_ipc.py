"""GPU memory another process shares by a CUDA IPC handle, through the CUDA driver API.

A client that holds a frame in GPU memory (a camera pipeline decoding on the GPU, a
tritonclient ``cuda_shared_memory`` region) exports a ``cudaIpcMemHandle_t``: 64 opaque bytes.
:meth:`IpcMemory.open` maps that allocation into this process; :meth:`IpcMemory.read` copies
bytes of it to host memory and :meth:`IpcMemory.write` copies host bytes into it. The
allocation's own process keeps it alive; :meth:`IpcMemory.close` unmaps it here.

The driver library (``libcuda.so.1``) comes with the NVIDIA driver, so this needs no CUDA
toolkit, no cuda-python and no torch; it is loaded on first use. Every call runs with the
device's primary context pushed on the calling thread (the one ONNX Runtime and PyTorch use).
:func:`export` allocates device memory and returns its IPC handle (the client's side, for tests
and benchmarks of the same mechanism).

>>> available()  # doctest: +SKIP
True
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from moesaic.errors import FailedPrecondition, InvalidInput

__all__ = ["HANDLE_BYTES", "IpcMemory", "available", "driver_problem", "export"]

HANDLE_BYTES = 64
"""Size of a ``cudaIpcMemHandle_t`` / ``CUipcMemHandle``."""

_LAZY_ENABLE_PEER_ACCESS = 0x1
_CUdeviceptr = ctypes.c_uint64


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * HANDLE_BYTES)]


class _Driver:
    """The few driver entry points used here, bound once."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        self.lib = lib
        self._check(lib.cuInit(0), "cuInit")
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()
        self.ipc_open = lib.cuIpcOpenMemHandle_v2
        self.ipc_open.argtypes = [ctypes.POINTER(_CUdeviceptr), _Handle, ctypes.c_uint]
        self.ipc_get = lib.cuIpcGetMemHandle
        self.ipc_get.argtypes = [ctypes.POINTER(_Handle), _CUdeviceptr]
        self.ipc_close = lib.cuIpcCloseMemHandle
        self.ipc_close.argtypes = [_CUdeviceptr]
        self.dtoh = lib.cuMemcpyDtoH_v2
        self.dtoh.argtypes = [ctypes.c_void_p, _CUdeviceptr, ctypes.c_size_t]
        self.htod = lib.cuMemcpyHtoD_v2
        self.htod.argtypes = [_CUdeviceptr, ctypes.c_void_p, ctypes.c_size_t]
        self.alloc = lib.cuMemAlloc_v2
        self.alloc.argtypes = [ctypes.POINTER(_CUdeviceptr), ctypes.c_size_t]
        self.free = lib.cuMemFree_v2
        self.free.argtypes = [_CUdeviceptr]
        self.range = lib.cuMemGetAddressRange_v2
        self.range.argtypes = [ctypes.POINTER(_CUdeviceptr), ctypes.POINTER(ctypes.c_size_t), _CUdeviceptr]
        self.push = lib.cuCtxPushCurrent_v2
        self.push.argtypes = [ctypes.c_void_p]
        self.pop = lib.cuCtxPopCurrent_v2
        self.pop.argtypes = [ctypes.POINTER(ctypes.c_void_p)]

    def error(self, code: int) -> str:
        name = ctypes.c_char_p()
        self.lib.cuGetErrorName(code, ctypes.byref(name))
        return name.value.decode() if name.value else f"CUresult {code}"

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            raise FailedPrecondition(f"CUDA {call} failed: {self.error(code)}", reason="cuda_error")

    def call(self, fn: Any, *args: object, what: str, bad_input: bool = False) -> None:
        code = fn(*args)
        if code != 0:
            message = f"{what}: CUDA {fn.__name__} failed: {self.error(code)}"
            raise (
                InvalidInput(message, reason="bad_cuda_handle")
                if bad_input
                else FailedPrecondition(message, reason="cuda_error")
            )

    @contextmanager
    def on(self, device: int) -> Iterator[None]:
        """The device's primary context current on this thread for the block."""
        with self._lock:
            ctx = self._contexts.get(device)
            if ctx is None:
                dev = ctypes.c_int()
                self._check(self.lib.cuDeviceGet(ctypes.byref(dev), device), f"cuDeviceGet({device})")
                ctx = ctypes.c_void_p()
                self._check(
                    self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain"
                )
                self._contexts[device] = ctx
        self._check(self.push(ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self.pop(ctypes.byref(ctypes.c_void_p()))


_driver: _Driver | None = None
_problem: str | None = None
_load_lock = threading.Lock()


def _load() -> _Driver:
    global _driver, _problem
    with _load_lock:
        if _driver is None and _problem is None:
            try:
                _driver = _Driver()
            except OSError as exc:
                _problem = f"no CUDA driver on this host ({exc})"
            except (AttributeError, FailedPrecondition) as exc:
                _problem = f"the CUDA driver cannot be used: {exc}"
    if _driver is None:
        raise FailedPrecondition(f"CUDA shared memory needs a CUDA device: {_problem}", reason="no_cuda")
    return _driver


def driver_problem() -> str | None:
    """Why CUDA IPC cannot be used here (None when it can)."""
    try:
        _load()
    except FailedPrecondition as exc:
        return exc.message
    return None


def available() -> bool:
    return driver_problem() is None


class IpcMemory:
    """``byte_size`` bytes of another process's GPU allocation, opened from its IPC handle."""

    def __init__(self, pointer: int, device: int, byte_size: int, *, owned: bool = False) -> None:
        self.pointer, self.device, self.byte_size = pointer, device, byte_size
        self._owned = owned
        self._closed = False

    @classmethod
    def open(cls, handle: bytes, device: int, byte_size: int) -> IpcMemory:
        """Map the allocation ``handle`` names; :class:`InvalidInput` for a handle or size that
        does not fit, :class:`FailedPrecondition` when this host has no usable CUDA driver."""
        if len(handle) != HANDLE_BYTES:
            raise InvalidInput(
                f"raw_handle: expected the {HANDLE_BYTES} bytes of a cudaIpcMemHandle_t, got {len(handle)}",
                reason="bad_cuda_handle",
            )
        if device < 0 or byte_size <= 0:
            raise InvalidInput(f"device_id {device} / byte_size {byte_size}: must be >= 0 / > 0")
        cuda = _load()
        pointer = _CUdeviceptr()
        with cuda.on(device):
            cuda.call(
                cuda.ipc_open,
                ctypes.byref(pointer),
                _Handle.from_buffer_copy(handle),
                _LAZY_ENABLE_PEER_ACCESS,
                what=f"CUDA IPC handle on device {device}",
                bad_input=True,
            )
            base, size = _CUdeviceptr(), ctypes.c_size_t()
            code = cuda.range(ctypes.byref(base), ctypes.byref(size), pointer)
            room = size.value - (pointer.value - base.value) if code == 0 else byte_size
            if byte_size > room:
                cuda.ipc_close(pointer)
                raise InvalidInput(
                    f"byte_size {byte_size} exceeds the {room} bytes of the shared allocation",
                    reason="region_too_large",
                )
        return cls(pointer.value, device, byte_size)

    def _span(self, offset: int, nbytes: int, what: str) -> int:
        if self._closed:
            raise FailedPrecondition(f"{what}: the CUDA region was unregistered", reason="unregistered")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.byte_size:
            raise InvalidInput(
                f"{what}: offset {offset} + byte_size {nbytes} exceed the region's {self.byte_size} bytes"
            )
        return self.pointer + offset

    def read(self, offset: int, nbytes: int, what: str = "region") -> np.ndarray:
        """A host copy (uint8) of ``nbytes`` bytes at ``offset``."""
        source = self._span(offset, nbytes, what)
        out = np.empty(nbytes, np.uint8)
        cuda = _load()
        with cuda.on(self.device):
            cuda.call(cuda.dtoh, out.ctypes.data, source, nbytes, what=what)
        return out

    def write(self, offset: int, data: np.ndarray, what: str = "region") -> None:
        """Copy the bytes of the host array ``data`` to ``offset``."""
        data = np.ascontiguousarray(data)
        target = self._span(offset, data.nbytes, what)
        cuda = _load()
        with cuda.on(self.device):
            cuda.call(cuda.htod, target, data.ctypes.data, data.nbytes, what=what)

    def handle(self) -> bytes:
        """The IPC handle of this allocation (only for memory this process allocated)."""
        cuda = _load()
        out = _Handle()
        with cuda.on(self.device):
            cuda.call(cuda.ipc_get, ctypes.byref(out), self.pointer, what="cuIpcGetMemHandle")
        return bytes(out)

    def close(self) -> None:
        """Unmap (or free, for memory :func:`export` allocated); idempotent."""
        if self._closed:
            return
        self._closed = True
        cuda = _load()
        with cuda.on(self.device):
            (cuda.free if self._owned else cuda.ipc_close)(self.pointer)


def export(byte_size: int, device: int = 0) -> tuple[IpcMemory, bytes]:
    """Allocate ``byte_size`` bytes on ``device``; (the memory, its 64-byte IPC handle)."""
    cuda = _load()
    pointer = _CUdeviceptr()
    with cuda.on(device):
        cuda.call(cuda.alloc, ctypes.byref(pointer), byte_size, what=f"cuMemAlloc({byte_size})")
    memory = IpcMemory(pointer.value, device, byte_size, owned=True)
    return memory, memory.handle()
