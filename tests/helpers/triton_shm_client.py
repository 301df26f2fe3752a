"""Drive a node's system shared-memory extension with tritonclient[grpc], unchanged, in its own
process (its ``inference.*`` protobuf package clashes with moesaic's stubs in one process).

    python tests/helpers/triton_shm_client.py ADDRESS

Against the test repository's ``add`` model (``y = x + 1``, ``total = sum(x)``): ``x`` goes
through a region, ``y`` comes back through another, ``total`` travels in the reply. Prints one
JSON object: the server's extensions, the regions' status, the outputs, and the errors of an
unregistered region and of a bad key.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException


def _error(call: Any) -> dict[str, str] | None:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return None


def main() -> int:
    client = triton.InferenceServerClient(sys.argv[1])
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    tag = uuid.uuid4().hex[:8]
    in_key, out_key = f"/moesaic_test_in_{tag}", f"/moesaic_test_out_{tag}"
    in_handle = shm.create_shared_memory_region("in", in_key, x.nbytes)
    out_handle = shm.create_shared_memory_region("out", out_key, x.nbytes)
    out: dict[str, Any] = {"extensions": list(client.get_server_metadata().extensions)}
    try:
        shm.set_shared_memory_region(in_handle, [x])
        client.register_system_shared_memory("in", in_key, x.nbytes)
        client.register_system_shared_memory("out", out_key, x.nbytes)
        status = client.get_system_shared_memory_status()
        out["status"] = sorted((r.name, r.key, r.byte_size) for r in status.regions.values())
        tensor = triton.InferInput("x", [3, 4], "FP32")
        tensor.set_shared_memory("in", x.nbytes)
        y = triton.InferRequestedOutput("y")
        y.set_shared_memory("out", x.nbytes)
        total = triton.InferRequestedOutput("total")
        for k in range(2):  # the second request reads the region's new contents
            shm.set_shared_memory_region(in_handle, [x * (k + 1)])
            result = client.infer("add", [tensor], outputs=[y, total])
            out[f"run{k}"] = {
                "y": shm.get_contents_as_numpy(out_handle, np.float32, [3, 4]).tolist(),
                "total": result.as_numpy("total").tolist(),
                "listed": [t.name for t in result.get_response().outputs],
            }
        bad = triton.InferInput("x", [3, 4], "FP32")
        bad.set_shared_memory("nope", x.nbytes)
        out["unregistered"] = _error(lambda: client.infer("add", [bad]))
        out["bad_key"] = _error(lambda: client.register_system_shared_memory("b", "/../etc/x", 4))
        out["twice"] = _error(lambda: client.register_system_shared_memory("in", in_key, x.nbytes))
        client.unregister_system_shared_memory()
        out["after_unregister"] = len(client.get_system_shared_memory_status().regions)
    finally:
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
