"""Drive a KServe v2 server with tritonclient[grpc], in its own process (its ``inference.*``
protobuf package clashes with moesaic's stubs in one process).

    python tests/helpers/triton_client.py ADDRESS MODEL REQUEST.json

REQUEST.json: {"inputs": [{"name", "datatype", "shape", "data" (nested list; BYTES as str)}],
"outputs": [names]}. Prints one JSON object: live, ready, model_ready, metadata (inputs and
outputs with name/datatype/shape), outputs ({name: {"datatype", "shape", "data"}}) or error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def _tensor_meta(items: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]


def main() -> int:
    address, model, request_file = sys.argv[1:4]
    with open(request_file) as f:
        request = json.load(f)
    client = triton.InferenceServerClient(address)
    out: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
    }
    meta = client.get_model_metadata(model)
    out["metadata"] = {
        "name": meta.name,
        "inputs": _tensor_meta(meta.inputs),
        "outputs": _tensor_meta(meta.outputs),
    }
    inputs = []
    for spec in request["inputs"]:
        tensor = triton.InferInput(spec["name"], spec["shape"], spec["datatype"])
        if spec["datatype"] == "BYTES":
            array = np.array([s.encode() for s in np.array(spec["data"]).reshape(-1)], dtype=object)
        else:
            array = np.array(spec["data"], dtype=triton_to_np_dtype(spec["datatype"]))
        tensor.set_data_from_numpy(array.reshape(spec["shape"]))
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(name) for name in request.get("outputs", [])] or None
    try:
        result = client.infer(model, inputs, outputs=outputs)
    except InferenceServerException as exc:
        out["error"] = {"status": exc.status(), "message": exc.message()}
        print(json.dumps(out))
        return 0
    response = result.get_response()
    out["parameters"] = {k: str(v).strip() for k, v in response.parameters.items()}
    out["outputs"] = {}
    for tensor in response.outputs:
        array = result.as_numpy(tensor.name)
        data = [x.decode() for x in array.reshape(-1)] if tensor.datatype == "BYTES" else array.tolist()
        out["outputs"][tensor.name] = {"datatype": tensor.datatype, "shape": list(tensor.shape), "data": data}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
