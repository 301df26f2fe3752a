"""The KServe/Triton shared-memory extensions: frames handed over in memory, not over gRPC.

A client on the node's host (the MQTT bridge, a camera process on a Jetson) creates a POSIX
shared-memory object, registers it with the node and then names it in ``ModelInfer`` instead of
sending the tensor bytes; tritonclient works unchanged::

    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    handle = shm.create_shared_memory_region("frame", "/cam0_frame", nbytes)
    shm.set_shared_memory_region(handle, [frame])
    client.register_system_shared_memory("frame", "/cam0_frame", nbytes)
    image = grpcclient.InferInput("image", list(frame.shape), "UINT8")
    image.set_shared_memory("frame", nbytes)
    client.infer("yolo-n", [image])

RPCs: ``SystemSharedMemoryStatus``, ``SystemSharedMemoryRegister`` and
``SystemSharedMemoryUnregister`` (an empty name: every region). An input tensor whose
parameters name ``shared_memory_region`` (with ``shared_memory_byte_size`` and optionally
``shared_memory_offset``) is read in place from that region (no copy; it takes no
``raw_input_contents`` entry); a requested output with those parameters is written into its
region, and the reply lists it without raw contents, after the outputs that travel. Keys are
names of ``/dev/shm`` objects, as ``shm_open`` takes them; nothing else can be mapped.

CUDA shared memory (``CudaSharedMemoryStatus``, ``CudaSharedMemoryRegister``,
``CudaSharedMemoryUnregister``): a client on the node's host whose tensor is already in GPU
memory registers the allocation's CUDA IPC handle (tritonclient's
``tritonclient.utils.cuda_shared_memory`` regions work unchanged) and names the region the same
way. The node maps it with :mod:`moesaic.runtime.cuda_ipc`; an input is copied once from the GPU
to the host (the pre-processing of every shipped processor runs there), an output once to the
GPU. A node without a CUDA driver answers the register call FAILED_PRECONDITION. Region names
are one namespace over both kinds, as in Triton.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from moesaic.errors import InvalidInput, NotFound, quote
from moesaic.nodes.wire import encode_varint
from moesaic.proto import inference_pb2
from moesaic.rpc import abort
from moesaic.runtime import cuda_ipc

__all__ = ["CUDA_EXTENSION", "EXTENSION", "CudaRegion", "Region", "RegionRef", "SharedMemory", "region_ref"]

log = logging.getLogger(__name__)

EXTENSION = "system_shared_memory"
"""The name ServerMetadata lists among the node's extensions."""
CUDA_EXTENSION = "cuda_shared_memory"
"""Listed too where the host has a usable CUDA driver."""

SHM_ROOT = Path("/dev/shm")
_REGION, _SIZE, _OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


@dataclass(frozen=True)
class RegionRef:
    """Where one tensor lives: a registered region's name, offset and byte size within it."""

    region: str
    offset: int
    byte_size: int


def region_ref(parameters: Mapping[str, Any], what: str) -> RegionRef | None:
    """The region a tensor's parameters name, or None; :class:`InvalidInput` naming ``what``."""
    if _REGION not in parameters:
        return None
    params = {key: parameters[key] for key in (_REGION, _SIZE, _OFFSET) if key in parameters}
    values = {
        key: getattr(p, p.WhichOneof("parameter_choice") or "string_param") for key, p in params.items()
    }
    region = values[_REGION]
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{what}: {_REGION} must name a region")
    size, offset = values.get(_SIZE), values.get(_OFFSET, 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{what}: {_SIZE} must be a byte count, got {size!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidInput(f"{what}: {_OFFSET} must be a byte offset, got {offset!r}")
    return RegionRef(region, offset, size)


class Region:
    """One registered region: ``byte_size`` bytes at ``offset`` of the shared-memory object ``key``."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        path = _object_path(key)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise InvalidInput(
                f"shared memory key {quote(key)}: cannot open {path}: {exc.strerror}"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size or byte_size == 0:
                raise InvalidInput(
                    f"shared memory region {quote(name)}: offset {offset} + byte_size {byte_size} "
                    f"does not fit the {size} bytes of {quote(key)}"
                )
            self._map = mmap.mmap(fd, offset + byte_size)
        finally:
            os.close(fd)
        self.view = memoryview(self._map)[offset : offset + byte_size]

    def slice(self, ref: RegionRef, what: str) -> memoryview:
        """The bytes ``ref`` names, in place; :class:`InvalidInput` naming ``what`` when outside."""
        if ref.offset + ref.byte_size > self.byte_size:
            raise InvalidInput(
                f"{what}: offset {ref.offset} + byte_size {ref.byte_size} exceed region "
                f"{quote(self.name)} ({self.byte_size} bytes)"
            )
        return self.view[ref.offset : ref.offset + ref.byte_size]

    def read(self, ref: RegionRef, what: str) -> memoryview:
        return self.slice(ref, what)

    def write(self, ref: RegionRef, data: np.ndarray, what: str) -> None:
        target = self.slice(ref, what)
        if data.nbytes > len(target):
            raise InvalidInput(f"{what}: {data.nbytes} bytes do not fit the {len(target)} bytes given")
        target[: data.nbytes] = data.data

    def close(self) -> None:
        """Unmap; arrays still reading it (a request in flight) keep it mapped until they go."""
        self.view.release()
        try:
            self._map.close()
        except BufferError:  # exported to an array of a request still running: unmapped with it
            log.debug("region %s still in use; unmapped when its last reader finishes", self.name)


class CudaRegion:
    """One registered CUDA region: ``byte_size`` bytes of a client's allocation on ``device_id``."""

    def __init__(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self.name, self.device_id, self.byte_size = name, device_id, byte_size
        self.memory = cuda_ipc.IpcMemory.open(raw_handle, device_id, byte_size)

    def _check(self, ref: RegionRef, what: str) -> None:
        if ref.offset + ref.byte_size > self.byte_size:
            raise InvalidInput(
                f"{what}: offset {ref.offset} + byte_size {ref.byte_size} exceed CUDA region "
                f"{quote(self.name)} ({self.byte_size} bytes)"
            )

    def read(self, ref: RegionRef, what: str) -> memoryview:
        """A host copy of the bytes ``ref`` names."""
        self._check(ref, what)
        return self.memory.read(ref.offset, ref.byte_size, what).data

    def write(self, ref: RegionRef, data: np.ndarray, what: str) -> None:
        self._check(ref, what)
        if data.nbytes > ref.byte_size:
            raise InvalidInput(f"{what}: {data.nbytes} bytes do not fit the {ref.byte_size} bytes given")
        self.memory.write(ref.offset, data, what)

    def close(self) -> None:
        self.memory.close()


def _object_path(key: str) -> Path:
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", ".."):
        raise InvalidInput(f"shared memory key {quote(key)}: expected a name like '/frame0' (shm_open)")
    return SHM_ROOT / name


class SharedMemory:
    """The node's registered shared-memory regions of both kinds, by name (thread-safe)."""

    def __init__(self) -> None:
        self._regions: dict[str, Region | CudaRegion] = {}
        self._lock = threading.Lock()

    def _add(self, name: str, make: Callable[[], Region | CudaRegion]) -> None:
        if not name:
            raise InvalidInput("shared memory region: a name is needed")
        with self._lock:
            if name in self._regions:
                raise InvalidInput(
                    f"shared memory region {quote(name)} is already registered", reason="already_exists"
                )
            self._regions[name] = make()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._add(name, lambda: Region(name, key, offset, byte_size))
        log.info("registered shared memory region %s (%s, %d bytes at %d)", name, key, byte_size, offset)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self._add(name, lambda: CudaRegion(name, raw_handle, device_id, byte_size))
        log.info("registered CUDA shared memory region %s (device %d, %d bytes)", name, device_id, byte_size)

    def unregister(self, name: str, kind: type[Region | CudaRegion] = Region) -> None:
        """Forget ``name`` (every region of ``kind`` when empty); unknown names are no error, as
        in Triton."""
        with self._lock:
            names = [n for n, r in self._regions.items() if isinstance(r, kind) and (not name or n == name)]
            regions = [self._regions.pop(n) for n in names]
        for region in regions:
            region.close()

    def status(self, name: str = "", kind: type[Region | CudaRegion] = Region) -> list[Any]:
        with self._lock:
            found = [r for n, r in self._regions.items() if isinstance(r, kind) and (not name or n == name)]
        if name and not found:
            raise NotFound(f"shared memory region {quote(name)} is not registered")
        return found

    def _region(self, ref: RegionRef, what: str) -> Region | CudaRegion:
        with self._lock:
            region = self._regions.get(ref.region)
        if region is None:
            raise InvalidInput(f"{what}: shared memory region {quote(ref.region)} is not registered")
        return region

    def read(self, ref: RegionRef, what: str) -> memoryview:
        """The bytes of a tensor in a region (in place for system memory, a copy from a GPU)."""
        return self._region(ref, what).read(ref, what)

    def write(self, ref: RegionRef, array: np.ndarray, what: str) -> None:
        """Write an output tensor's bytes into its region."""
        if array.dtype == object:
            from moesaic.nodes.codec import serialize_bytes_tensor

            data = np.frombuffer(serialize_bytes_tensor(array), np.uint8)
        else:
            data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._region(ref, what).write(ref, data, what)

    def close(self) -> None:
        self.unregister("", Region)
        self.unregister("", CudaRegion)

    @staticmethod
    def extensions() -> list[str]:
        """The extensions ServerMetadata lists: CUDA only where this host can map GPU memory."""
        return [EXTENSION, *([CUDA_EXTENSION] if cuda_ipc.available() else [])]

    # -------------------------------------------------------------- gRPC adapters

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The extensions' RPCs, for ``inference.GRPCInferenceService``."""
        pb = inference_pb2

        def typed(fn: Callable[[Any], Any], request: Any) -> grpc.RpcMethodHandler:
            def call(req: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return fn(req)
                except Exception as exc:
                    abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=request.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        return {
            "SystemSharedMemoryStatus": typed(self._status_rpc, pb.SystemSharedMemoryStatusRequest),
            "SystemSharedMemoryRegister": typed(self._register_rpc, pb.SystemSharedMemoryRegisterRequest),
            "SystemSharedMemoryUnregister": typed(
                lambda r: self._unregister_rpc(r, Region, pb.SystemSharedMemoryUnregisterResponse),
                pb.SystemSharedMemoryUnregisterRequest,
            ),
            "CudaSharedMemoryStatus": typed(self._cuda_status_rpc, pb.CudaSharedMemoryStatusRequest),
            "CudaSharedMemoryRegister": typed(self._cuda_register_rpc, pb.CudaSharedMemoryRegisterRequest),
            "CudaSharedMemoryUnregister": typed(
                lambda r: self._unregister_rpc(r, CudaRegion, pb.CudaSharedMemoryUnregisterResponse),
                pb.CudaSharedMemoryUnregisterRequest,
            ),
        }

    def _status_rpc(self, request: Any) -> Any:
        reply = inference_pb2.SystemSharedMemoryStatusResponse()
        for region in self.status(request.name, Region):
            reply.regions[region.name].CopyFrom(
                inference_pb2.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return reply

    def _cuda_status_rpc(self, request: Any) -> Any:
        reply = inference_pb2.CudaSharedMemoryStatusResponse()
        for region in self.status(request.name, CudaRegion):
            reply.regions[region.name].CopyFrom(
                inference_pb2.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, device_id=region.device_id, byte_size=region.byte_size
                )
            )
        return reply

    def _register_rpc(self, request: Any) -> Any:
        self.register(request.name, request.key, request.offset, request.byte_size)
        return inference_pb2.SystemSharedMemoryRegisterResponse()

    def _cuda_register_rpc(self, request: Any) -> Any:
        self.register_cuda(request.name, request.raw_handle, request.device_id, request.byte_size)
        return inference_pb2.CudaSharedMemoryRegisterResponse()

    def _unregister_rpc(self, request: Any, kind: type[Region | CudaRegion], response: Any) -> Any:
        self.unregister(request.name, kind)
        return response()

    def output_fields(
        self, outputs: Mapping[str, np.ndarray], refs: Mapping[str, RegionRef]
    ) -> tuple[dict[str, np.ndarray], bytes]:
        """Write the outputs that go to regions; (the outputs that travel, the reply's entries
        for those in regions: name, datatype, shape and the region parameters, no contents)."""
        from moesaic.runtime.engine import datatype_of

        travel = {k: v for k, v in outputs.items() if k not in refs}
        entries = []
        for name, ref in refs.items():
            if name not in outputs:
                continue
            array = outputs[name]
            self.write(ref, array, f"output {quote(name)}")
            tensor = inference_pb2.ModelInferResponse.InferOutputTensor(
                name=name, datatype=datatype_of(array.dtype), shape=array.shape
            )
            tensor.parameters[_REGION].string_param = ref.region
            tensor.parameters[_SIZE].int64_param = ref.byte_size
            if ref.offset:
                tensor.parameters[_OFFSET].int64_param = ref.offset
            body = tensor.SerializeToString()
            entries.append(b"\x2a" + encode_varint(len(body)) + body)
        return travel, b"".join(entries)
