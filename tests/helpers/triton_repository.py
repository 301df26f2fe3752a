"""Drive a node's model repository with tritonclient[grpc], unchanged, in its own process.

    python tests/helpers/triton_repository.py ADDRESS STEPS.json

STEPS.json is a list of steps, each a list: ``["index"]``, ``["index_ready"]``,
``["load", MODEL, CONFIG_JSON_OR_NULL]``, ``["unload", MODEL]``, ``["ready", MODEL, VERSION]``,
``["config", MODEL, VERSION]``, ``["metadata", MODEL, VERSION]``, ``["server_metadata"]``,
``["infer", MODEL, VERSION, X]`` (FP32 input ``x``, output ``y``). Prints one JSON list with
each step's result, or ``{"error": STATUS, "message": ...}`` for a step that raised.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def run(client: triton.InferenceServerClient, step: list[Any]) -> Any:
    kind, args = step[0], step[1:]
    if kind == "index":
        return client.get_model_repository_index(as_json=True).get("models", [])
    if kind == "index_ready":
        return [
            {"name": m.name, "version": m.version, "state": m.state}
            for m in client.get_model_repository_index().models
            if m.state == "READY"
        ]
    if kind == "load":
        client.load_model(args[0], config=args[1])
        return "ok"
    if kind == "unload":
        client.unload_model(args[0])
        return "ok"
    if kind == "ready":
        return client.is_model_ready(args[0], args[1])
    if kind == "config":
        return client.get_model_config(args[0], args[1], as_json=True)["config"]
    if kind == "metadata":
        return client.get_model_metadata(args[0], args[1], as_json=True)
    if kind == "server_metadata":
        return client.get_server_metadata(as_json=True)
    if kind == "infer":
        x = np.asarray(args[2], dtype=np.float32)
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(
            args[0], [tensor], model_version=args[1], outputs=[triton.InferRequestedOutput("y")]
        )
        return {"version": result.get_response().model_version, "y": result.as_numpy("y").tolist()}
    raise ValueError(f"unknown step {kind!r}")


def main() -> int:
    address, steps_file = sys.argv[1:3]
    with open(steps_file) as f:
        steps = json.load(f)
    client = triton.InferenceServerClient(address)
    out: list[Any] = []
    for step in steps:
        try:
            out.append(run(client, step))
        except InferenceServerException as exc:
            out.append({"error": exc.status(), "message": exc.message()})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
