"""gRPC adapters of the node: KServe v2 ``inference.GRPCInferenceService`` and ``moesaic.v1.Node``.

``ModelInfer`` is registered with no protobuf (de)serialiser: it receives the request's wire
bytes, cuts the tensors out as ``memoryview`` slices (:mod:`moesaic.nodes.codec`), reads them
with ``np.frombuffer`` and writes the reply the same way. Every reply carries the cost of
the engine call as parameters ``compute_ms``, ``energy_mj`` (double) and ``energy_source``
(string: nvml, jetson-ina3221, rapl or estimate). A model with ``dynamic_batching`` goes
through its :class:`~moesaic.nodes.batching.DynamicBatcher`, and its replies carry the
request's share of the batch's cost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from time import perf_counter
from typing import Any

import grpc
import numpy as np

from moesaic import __version__
from moesaic.metrics import Metrics
from moesaic.nodes.codec import (
    RAW_INPUT_FIELD,
    decode_tensor,
    encode_response,
    from_parameters,
    split_message,
    tensor_from_contents,
)
from moesaic.nodes.repository import ServedModel
from moesaic.proto import inference_pb2, moesaic_pb2, moesaic_pb2_grpc
from moesaic.rpc import UnavailableError, abort, status_of
from moesaic.runtime.devices import DeviceInfo
from moesaic.runtime.energy import EnergyMeter, EstimateMeter
from moesaic.runtime.profiler import ProfileRecord

__all__ = ["INFERENCE_SERVICE", "NODE_SERVICE", "InferenceServicer", "NodeServicer", "validate_inputs"]

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
NODE_SERVICE = "moesaic.v1.Node"
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch_libtorch"}


Accepted = dict[tuple[str, str, tuple[int, ...]], tuple[np.dtype[Any], int]]
"""Input signatures (name, datatype, shape) already validated for one model: dtype, byte length."""

_ACCEPTED_LIMIT = 256


def validate_inputs(
    model: ServedModel, header: Any, raws: Sequence[memoryview], accepted: Accepted | None = None
) -> dict[str, np.ndarray]:
    """Input arrays of a request, checked against the model's inputs; ``ValueError`` naming the input.

    ``accepted`` (one dict per model, kept by the caller) remembers raw input signatures that
    passed, so a request shaped like an earlier one is checked with one lookup per input.
    """
    if accepted is not None and raws and len(raws) == len(header.inputs):
        out: dict[str, np.ndarray] = {}
        for tensor, raw in zip(header.inputs, raws, strict=True):
            shape = tuple(tensor.shape)
            known = accepted.get((tensor.name, tensor.datatype, shape))
            if known is None or len(raw) != known[1] or tensor.name in out:
                break  # the full check below says what is wrong (or learns this signature)
            out[tensor.name] = np.frombuffer(raw, dtype=known[0]).reshape(shape)
        else:
            if len(out) == len(model.input_specs):
                return out
    out = _check_inputs(model, header, raws)
    if accepted is not None and raws:
        if len(accepted) >= _ACCEPTED_LIMIT:
            accepted.clear()
        for tensor, raw in zip(header.inputs, raws, strict=True):
            if tensor.datatype != "BYTES":
                accepted[(tensor.name, tensor.datatype, tuple(tensor.shape))] = (
                    out[tensor.name].dtype,
                    len(raw),
                )
    return out


def _check_inputs(model: ServedModel, header: Any, raws: Sequence[memoryview]) -> dict[str, np.ndarray]:
    specs = model.input_specs
    tensors = header.inputs
    if raws and len(raws) != len(tensors):
        raise ValueError(f"raw_input_contents holds {len(raws)} entries for {len(tensors)} inputs")
    max_batch = model.spec.max_batch_size
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise ValueError(
                f"input {name!r}: model {model.name!r} has no such input; expected {sorted(specs)}"
            )
        if name in out:
            raise ValueError(f"input {name!r}: given twice")
        if tensor.datatype != spec.datatype:
            raise ValueError(
                f"input {name!r}: datatype {tensor.datatype or '(empty)'}; expected {spec.datatype}"
            )
        shape = tuple(tensor.shape)
        if not spec.accepts_shape(shape):
            raise ValueError(
                f"input {name!r}: shape {list(shape)}; expected {list(spec.shape)} (-1 = any size)"
            )
        if max_batch and shape and shape[0] > max_batch:
            raise ValueError(f"input {name!r}: batch {shape[0]} exceeds max_batch_size {max_batch}")
        if raws:
            out[name] = decode_tensor(name, spec.datatype, shape, raws[i])
        else:
            out[name] = tensor_from_contents(name, spec.datatype, shape, tensor.contents)
    if len(out) != len(specs):
        missing = sorted(specs.keys() - out.keys())
        raise ValueError(f"inputs {missing} missing; model {model.name!r} needs {sorted(specs)}")
    return out


class _Plan:
    """What one request header resolves to, kept so that the next request with the same header
    bytes (same model, tensor names, datatypes, shapes, parameters; no request id) skips
    protobuf parsing and validation: each input then costs a length check and a view."""

    __slots__ = ("model", "model_version", "parameters", "requested", "specs", "tensors")

    def __init__(self, model: ServedModel, header: Any, inputs: Mapping[str, np.ndarray], raws: Any) -> None:
        self.model = model
        self.specs = model.input_specs  # a reload builds a new dict: the plan then no longer applies
        self.tensors = tuple(
            (t.name, inputs[t.name].dtype, tuple(t.shape), len(raw))
            for t, raw in zip(header.inputs, raws, strict=True)
        )
        self.parameters = from_parameters(header.parameters) if header.parameters else None
        self.requested = tuple(out.name for out in header.outputs)
        self.model_version: str = header.model_version

    def bind(self, raws: Sequence[memoryview]) -> dict[str, np.ndarray] | None:
        """The request's input views, or None when the plan does not fit (then parse in full)."""
        model = self.model
        if model.state != "ready" or model.input_specs is not self.specs or len(raws) != len(self.tensors):
            return None
        inputs = {}
        for (name, dtype, shape, nbytes), raw in zip(self.tensors, raws, strict=True):
            if len(raw) != nbytes:
                return None
            inputs[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
        return inputs


_PLAN_LIMIT = 256
_PLAN_HEADER_BYTES = 4096


class InferenceServicer:
    """KServe v2 data plane over the node's models."""

    def __init__(
        self,
        models: Mapping[str, ServedModel],
        meter: EnergyMeter,
        metrics: Metrics,
        *,
        is_ready: Callable[[], bool],
    ) -> None:
        self.models = models
        self.meter = meter
        self.metrics = metrics
        self.is_ready = is_ready
        # Metric children looked up once (``labels()`` is slow), one tuple per model.
        self._ok = metrics.requests.labels(method="ModelInfer", code="OK")
        source = "measured" if meter.measured else "estimated"
        self._observe = {
            name: (
                metrics.expert_latency.labels(expert=name),
                metrics.energy.labels(expert=name, source=source),
            )
            for name in models
        }
        # An estimate is watts x seconds: no meter reads around the engine call.
        self._estimate_watts = meter.watts if type(meter) is EstimateMeter else None
        self._accepted: dict[str, tuple[Mapping[str, Any], Accepted]] = {}
        self._plans: dict[bytes, _Plan] = {}

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        pb = inference_pb2

        def typed(fn: Callable[..., Any], request: Any) -> grpc.RpcMethodHandler:
            return unary(
                fn,
                request_deserializer=request.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        return grpc.method_handlers_generic_handler(
            INFERENCE_SERVICE,
            {
                "ServerLive": typed(self.server_live, pb.ServerLiveRequest),
                "ServerReady": typed(self.server_ready, pb.ServerReadyRequest),
                "ModelReady": typed(self.model_ready, pb.ModelReadyRequest),
                "ServerMetadata": typed(self.server_metadata, pb.ServerMetadataRequest),
                "ModelMetadata": typed(self.model_metadata, pb.ModelMetadataRequest),
                "ModelInfer": unary(self.model_infer),  # bytes in, bytes out
            },
        )

    # -------------------------------------------------------------- lookup

    def _model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise LookupError(f"model {name!r} not found; this node serves {sorted(self.models)}")
        return model

    def _ready_model(self, name: str) -> ServedModel:
        model = self._model(name)
        if model.state != "ready":
            detail = f": {model.error}" if model.error else ""
            raise UnavailableError(f"model {name!r} is {model.state}{detail}")
        return model

    # -------------------------------------------------------------- control plane

    def server_live(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerLiveResponse(live=True)

    def server_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerReadyResponse(ready=self.is_ready())

    def model_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return inference_pb2.ModelReadyResponse(ready=self._model(request.name).ready)
        except Exception as exc:
            abort(context, exc)

    def server_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerMetadataResponse(name="moesaic", version=__version__, extensions=[])

    def model_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            model = self._ready_model(request.name)
        except Exception as exc:
            abort(context, exc)
        meta = inference_pb2.ModelMetadataResponse(
            name=model.name, versions=["1"], platform=_PLATFORMS.get(model.engine_type, model.engine_type)
        )
        for spec in model.inputs:
            meta.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.outputs:
            meta.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return meta

    # -------------------------------------------------------------- data plane

    def _accepted_for(self, model: ServedModel) -> Accepted:
        """The model's cache of validated input signatures (new after a reload)."""
        entry = self._accepted.get(model.name)
        if entry is None or entry[0] is not model.input_specs:
            entry = self._accepted[model.name] = (model.input_specs, {})
        return entry[1]

    def _parse(
        self, header_bytes: bytes, raws: list[memoryview]
    ) -> tuple[ServedModel, dict[str, np.ndarray], _Plan | None, Any]:
        """Full decode and validation of a request whose header has no plan yet."""
        header = inference_pb2.ModelInferRequest.FromString(header_bytes)
        model = self._ready_model(header.model_name)
        inputs = validate_inputs(model, header, raws, self._accepted_for(model))
        plan = None
        if (
            raws
            and not header.id
            and len(header_bytes) <= _PLAN_HEADER_BYTES
            and all(t.datatype != "BYTES" for t in header.inputs)
        ):
            plans = self._plans
            if len(plans) >= _PLAN_LIMIT:
                plans.clear()
            plan = plans[header_bytes] = _Plan(model, header, inputs, raws)
        return model, inputs, plan, header

    def model_infer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            header_bytes, raws = split_message(data, RAW_INPUT_FIELD)
            plan = self._plans.get(header_bytes)
            inputs = plan.bind(raws) if plan is not None else None
            if inputs is None or plan is None:
                model, inputs, plan, header = self._parse(header_bytes, raws)
            else:
                model = plan.model
            if plan is not None:
                parameters = dict(plan.parameters) if plan.parameters else {}
                requested: Sequence[str] = plan.requested
                request_id, model_version = "", plan.model_version
            else:
                parameters = from_parameters(header.parameters) if header.parameters else {}
                requested = [out.name for out in header.outputs]
                request_id, model_version = header.id, header.model_version
            if model.batcher is None:
                watts = self._estimate_watts
                if watts is None:
                    meter = self.meter
                    start_j = meter.joules()
                    start = perf_counter()
                    outputs = model.infer(inputs, parameters)
                    seconds = perf_counter() - start
                    joules = meter.joules() - start_j
                else:
                    start = perf_counter()
                    outputs = model.infer(inputs, parameters)
                    seconds = perf_counter() - start
                    joules = watts * seconds
            else:
                share = model.infer_batched(inputs, parameters, context.time_remaining())
                outputs, seconds, joules = share.outputs, share.seconds, share.joules
            if requested:
                outputs = self._requested(model, outputs, requested)
            reply = encode_response(
                model.name,
                outputs,
                parameters={
                    "compute_ms": seconds * 1e3,
                    "energy_mj": joules * 1e3,
                    "energy_source": self.meter.source,
                },
                request_id=request_id,
                model_version=model_version,
            )
        except Exception as exc:
            code, _ = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("ModelInfer failed")
            self.metrics.requests.labels(method="ModelInfer", code=code.name).inc()
            abort(context, exc)
        self._ok.inc()
        latency, energy = self._observe[model.name]
        latency.observe(seconds)
        energy.inc(max(joules, 0.0))
        return reply

    @staticmethod
    def _requested(
        model: ServedModel, outputs: dict[str, np.ndarray], requested: Sequence[str]
    ) -> dict[str, np.ndarray]:
        chosen = {}
        for name in requested:
            if name not in outputs:
                raise ValueError(
                    f"output {name!r}: model {model.name!r} has no such output; has {sorted(outputs)}"
                )
            chosen[name] = outputs[name]
        return chosen


class NodeServicer(moesaic_pb2_grpc.NodeServicer):
    """``moesaic.v1.Node/Describe``: device, models and their measured profiles."""

    def __init__(
        self,
        node_id: str,
        device: DeviceInfo,
        models: Mapping[str, ServedModel],
        profiles: Sequence[ProfileRecord],
    ) -> None:
        self.node_id = node_id
        self.device = device
        self.models = models
        self.profiles = list(profiles)

    def Describe(self, request: Any, context: grpc.ServicerContext) -> Any:
        d = self.device
        reply = moesaic_pb2.NodeDescription(
            node_id=self.node_id,
            version=__version__,
            device=moesaic_pb2.Device(
                kind=d.kind,
                name=d.name,
                memory_bytes=d.memory_bytes,
                power_limit_watts=d.power_limit_watts,
                cores=d.cores,
                energy_source=d.energy_source,
                id=d.id,
            ),
        )
        for model in self.models.values():
            desc = reply.models.add(
                name=model.name,
                task=model.spec.task,
                engine=model.engine_type,
                ready=model.ready,
                state=model.state,
                class_names=model.class_names,
                error=model.error,
            )
            for rec in self.profiles:
                if rec.model != model.name:
                    continue
                desc.profiles.add(
                    batch_size=rec.batch_size,
                    latency_ms=moesaic_pb2.LatencyQuantiles(
                        p50=rec.latency_ms.p50, p95=rec.latency_ms.p95, p99=rec.latency_ms.p99
                    ),
                    throughput_per_s=rec.throughput_per_s,
                    energy_mj_per_inference=rec.energy_mj_per_inference,
                    idle_watts=rec.idle_watts,
                    energy_source=rec.energy_source,
                    engine=rec.engine,
                )
        return reply
