"""Drive a node's CUDA shared-memory extension with tritonclient[grpc], unchanged, in its own
process (a CUDA IPC handle cannot be opened by the process that exported it, and tritonclient's
``inference.*`` protobuf package clashes with moesaic's stubs in one process).

    python tests/helpers/triton_cuda_shm_client.py ADDRESS MODE

MODE ``triton``: regions made by ``tritonclient.utils.cuda_shared_memory`` (needs cuda-python);
``moesaic``: regions made by :func:`moesaic.runtime.cuda_ipc.export` (driver API only);
``refused``: only the calls a node without CUDA must refuse. Against the test repository's
``add`` model (``y = x + 1``, ``total = sum(x)``): ``x`` is read from one GPU region, ``y``
written into another, ``total`` travels in the reply. Prints one JSON object.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

SHAPE = (3, 4)


def _error(call: Any) -> dict[str, str] | None:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return None


class TritonRegion:
    def __init__(self, name: str, nbytes: int) -> None:
        import tritonclient.utils.cuda_shared_memory as cudashm

        self.shm = cudashm
        self.handle = cudashm.create_shared_memory_region(name, nbytes, 0)
        self.raw = cudashm.get_raw_handle(self.handle)

    def set(self, x: np.ndarray) -> None:
        self.shm.set_shared_memory_region(self.handle, [x])

    def get(self) -> np.ndarray:
        return self.shm.get_contents_as_numpy(self.handle, np.float32, list(SHAPE))

    def close(self) -> None:
        self.shm.destroy_shared_memory_region(self.handle)


class MoesaicRegion:
    def __init__(self, name: str, nbytes: int) -> None:
        from moesaic.runtime import cuda_ipc

        self.memory, handle = cuda_ipc.export(nbytes, 0)
        self.raw = base64.b64encode(handle)
        self.nbytes = nbytes

    def set(self, x: np.ndarray) -> None:
        self.memory.write(0, x.view(np.uint8).reshape(-1))

    def get(self) -> np.ndarray:
        return self.memory.read(0, self.nbytes).view(np.float32).reshape(SHAPE)

    def close(self) -> None:
        self.memory.close()


def refused(client: triton.InferenceServerClient) -> dict[str, Any]:
    return {
        "no_cuda": _error(
            lambda: client.register_cuda_shared_memory("g", base64.b64encode(bytes(64)), 0, 48)
        ),
        "short_handle": _error(
            lambda: client.register_cuda_shared_memory("g", base64.b64encode(b"abc"), 0, 48)
        ),
    }


def round_trip(client: triton.InferenceServerClient, make: Any) -> dict[str, Any]:
    x = np.arange(12, dtype=np.float32).reshape(SHAPE)
    regions = {name: make(name, x.nbytes) for name in ("in", "out", "spare")}
    out: dict[str, Any] = {}
    try:
        for name in ("in", "out"):
            client.register_cuda_shared_memory(name, regions[name].raw, 0, x.nbytes)
        status = client.get_cuda_shared_memory_status()
        out["status"] = sorted((r.name, r.device_id, r.byte_size) for r in status.regions.values())
        tensor = triton.InferInput("x", list(SHAPE), "FP32")
        tensor.set_shared_memory("in", x.nbytes)
        y = triton.InferRequestedOutput("y")
        y.set_shared_memory("out", x.nbytes)
        total = triton.InferRequestedOutput("total")
        for k in range(2):  # the second request reads the region's new contents
            regions["in"].set(x * (k + 1))
            result = client.infer("add", [tensor], outputs=[y, total])
            out[f"run{k}"] = {
                "y": regions["out"].get().tolist(),
                "total": result.as_numpy("total").tolist(),
                "listed": [t.name for t in result.get_response().outputs],
            }
        big = triton.InferInput("x", list(SHAPE), "FP32")
        big.set_shared_memory("in", x.nbytes, offset=8)
        out["outside"] = _error(lambda: client.infer("add", [big]))
        out["twice"] = _error(
            lambda: client.register_cuda_shared_memory("in", regions["in"].raw, 0, x.nbytes)
        )
        out["too_large"] = _error(
            lambda: client.register_cuda_shared_memory("huge", regions["spare"].raw, 0, 1 << 40)
        )
        client.unregister_cuda_shared_memory()
        out["after_unregister"] = len(client.get_cuda_shared_memory_status().regions)
        out["after_unregister_infer"] = _error(lambda: client.infer("add", [tensor]))
    finally:
        for region in regions.values():
            region.close()
    return out


def main() -> int:
    client = triton.InferenceServerClient(sys.argv[1])
    mode = sys.argv[2]
    out: dict[str, Any] = {"extensions": list(client.get_server_metadata().extensions)}
    out.update(refused(client) if mode == "refused" else {})
    if mode in ("triton", "moesaic"):
        out.update(round_trip(client, TritonRegion if mode == "triton" else MoesaicRegion))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
