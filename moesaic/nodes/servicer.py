"""gRPC adapters of the node: KServe v2 ``inference.GRPCInferenceService`` and ``moesaic.v1.Node``.

``ModelInfer`` is registered with no protobuf (de)serialiser: it receives the request's wire
bytes, cuts the tensors out as ``memoryview`` slices (:mod:`moesaic.nodes.wire`), reads them
with ``np.frombuffer`` (validated by :mod:`moesaic.nodes.validation`), hands them to the
transport-free :class:`~moesaic.nodes.dataplane.DataPlane` with the call's deadline (the gRPC
deadline or the ``deadline_ms`` parameter, whichever is earlier) and writes the reply the same
way. Every reply carries parameters ``compute_ms`` (pre + engine + post), ``queue_ms``,
``energy_mj`` (attributed dynamic energy), ``energy_source`` (``nvml``, ``jetson-ina3221``,
``rapl`` or ``estimate``, with ``+attributed``), ``queue_depth`` and ``expected_wait_ms``,
and ``model_version`` names the version that answered.

Versions: a request naming no version goes to the highest version served; one naming a
version not served gets NOT_FOUND. The repository extension (``RepositoryIndex``,
``RepositoryModelLoad`` with an optional ``config`` JSON, ``RepositoryModelUnload``) and
``ModelConfig`` (Triton's fields, plus task, class names, input format and more as
``parameters``) drive :class:`~moesaic.nodes.lifecycle.ModelLifecycle`, so tritonclient's
``get_model_repository_index``, ``load_model``, ``unload_model`` and ``get_model_config``
work unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from moesaic import __version__
from moesaic.errors import InvalidInput, NotFound, Unavailable
from moesaic.metrics import Metrics
from moesaic.nodes.codec import ReplyWriter, encode_response
from moesaic.nodes.dataplane import DataPlane
from moesaic.nodes.lifecycle import ModelLifecycle
from moesaic.nodes.served import ServedModel
from moesaic.nodes.shm import SharedMemory
from moesaic.nodes.validation import Decoded, RequestValidator
from moesaic.nodes.wire import RAW_INPUT_FIELD
from moesaic.proto import inference_pb2, moesaic_pb2, moesaic_pb2_grpc
from moesaic.rpc import abort, status_of
from moesaic.runtime.devices import DeviceInfo
from moesaic.runtime.profiler import ProfileRecord

__all__ = ["INFERENCE_SERVICE", "NODE_SERVICE", "InferenceServicer", "NodeServicer"]

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
NODE_SERVICE = "moesaic.v1.Node"
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch_libtorch"}
_BACKENDS = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch": "pytorch"}
_EXTENSIONS = ["model_repository", "model_configuration"]
_RESOLVE_TRIES = 3
"""Times a request looks its model up again when the version it found was just retired."""


class InferenceServicer:
    """KServe v2 ``GRPCInferenceService`` over the node's :class:`DataPlane`."""

    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics,
        *,
        is_ready: Callable[[], bool],
        lifecycle: ModelLifecycle | None = None,
    ) -> None:
        self.plane = plane
        self.metrics = metrics
        self.is_ready = is_ready
        self.lifecycle = lifecycle
        self.shared_memory = SharedMemory()  # the shared-memory extensions' regions (system, CUDA)
        self.validator = RequestValidator(plane.ready_model, self.shared_memory)
        self._ok = metrics.requests.labels(method="ModelInfer", code="OK")
        self._writers: dict[ServedModel, ReplyWriter] = {}

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
                "ModelConfig": typed(self.model_config, pb.ModelConfigRequest),
                "RepositoryIndex": typed(self.repository_index, pb.RepositoryIndexRequest),
                "RepositoryModelLoad": typed(self.repository_load, pb.RepositoryModelLoadRequest),
                "RepositoryModelUnload": typed(self.repository_unload, pb.RepositoryModelUnloadRequest),
                **self.shared_memory.handlers(),
            },
        )

    # -------------------------------------------------------------- control plane

    def server_live(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerLiveResponse(live=True)

    def server_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        return inference_pb2.ServerReadyResponse(ready=self.is_ready())

    def model_ready(self, request: Any, context: grpc.ServicerContext) -> Any:
        """True when that version (default: the one serving requests naming none) is ready; an
        unknown version of a served model is not ready; an unknown model is NOT_FOUND."""
        try:
            model = self.plane.model(request.name, request.version)
        except NotFound as exc:
            known = self.lifecycle is not None and request.name in self.lifecycle.entries
            if known or request.name in self.plane.models:
                return inference_pb2.ModelReadyResponse(ready=False)
            abort(context, exc)
        except Exception as exc:
            abort(context, exc)
        return inference_pb2.ModelReadyResponse(ready=model.ready)

    def server_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        extensions = [*(_EXTENSIONS if self.lifecycle is not None else []), *SharedMemory.extensions()]
        return inference_pb2.ServerMetadataResponse(
            name="moesaic", version=__version__, extensions=extensions
        )

    def model_metadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            model = self.plane.ready_model(request.name, request.version)
        except Exception as exc:
            abort(context, exc)
        served = sorted(self.plane.versions.get(model.name, {model.version: model}))
        meta = inference_pb2.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in served],
            platform=_PLATFORMS.get(model.engine_type, model.engine_type),
        )
        for spec in model.inputs:
            meta.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.outputs:
            meta.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return meta

    def model_config(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            model = self.plane.ready_model(request.name, request.version)
        except Exception as exc:
            abort(context, exc)
        served = sorted(self.plane.versions.get(model.name, {model.version: model}))
        return inference_pb2.ModelConfigResponse(config=model_config_of(model, served))

    # -------------------------------------------------------------- repository extension

    def _lifecycle(self) -> ModelLifecycle:
        if self.lifecycle is None:
            raise Unavailable("this server has no model repository to manage", reason="no_repository")
        return self.lifecycle

    def repository_index(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check_repository(request.repository_name)
            rows = self._lifecycle().index(ready_only=request.ready)
        except Exception as exc:
            abort(context, exc)
        reply = inference_pb2.RepositoryIndexResponse()
        for row in rows:
            reply.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return reply

    def repository_load(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check_repository(request.repository_name)
            config = _load_config(request.parameters)
            self._lifecycle().load(request.model_name, config)
        except Exception as exc:
            self.metrics.requests.labels(method="RepositoryModelLoad", code=status_of(exc)[0].name).inc()
            abort(context, exc)
        self.metrics.requests.labels(method="RepositoryModelLoad", code="OK").inc()
        return inference_pb2.RepositoryModelLoadResponse()

    def repository_unload(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check_repository(request.repository_name)
            self._lifecycle().unload(request.model_name)
        except Exception as exc:
            abort(context, exc)
        return inference_pb2.RepositoryModelUnloadResponse()

    # -------------------------------------------------------------- data plane

    def _decode_held(self, data: bytes) -> Decoded:
        """Decode and validate ``data``, holding the model version it resolves (release it);
        a version retired by a swap in between is resolved again."""
        for _ in range(_RESOLVE_TRIES):
            request = self.validator.decode(data, RAW_INPUT_FIELD)
            if request.model.acquire():
                return request
        raise Unavailable(f"model {request.model.name!r} is being swapped; retry", reason="swapping")

    def model_infer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            request = self.validator.decode(data, RAW_INPUT_FIELD)
            model = request.model
            if not model.acquire():  # retired by a swap since: look the model up again
                request = self._decode_held(data)
                model = request.model
            try:
                remaining = context.time_remaining()
                if request.deadline_ms is None:
                    deadline = None if remaining is None else time.monotonic() + remaining
                else:
                    deadline = _deadline(remaining, request.deadline_ms)
                reply = self.plane.infer(
                    model,
                    request.inputs,
                    request.parameters,
                    requested=request.requested,
                    deadline=deadline,
                    alive=context.is_active,
                )
            finally:
                model.release()
            stages, queue = reply.stages, reply.queue
            numbers = (
                stages.compute * 1e3,
                stages.queue * 1e3,
                reply.energy_j * 1e3,
                queue.expected_wait_s * 1e3,
            )
            if request.output_regions or request.request_id:
                data_out = self._encode_rare(request, reply.outputs, numbers, queue.depth)
            else:
                writer = self._writers.get(model) or self._writer(model)
                data_out = writer.encode(numbers, (queue.depth,), reply.outputs)
        except Exception as exc:
            code, _ = status_of(exc)
            self.metrics.requests.labels(method="ModelInfer", code=code.name).inc()
            abort(context, exc)
        self._ok.inc()
        return data_out

    def _writer(self, model: ServedModel) -> ReplyWriter:
        writers = self._writers
        if len(writers) >= 64:  # versions come and go: keep the writers of recent ones
            writers.clear()
        writer = writers[model] = ReplyWriter(
            model.name,
            model.version_str,
            doubles=_REPLY_DOUBLES,
            counts=("queue_depth",),
            fixed={"energy_source": self.plane.cost.source},
        )
        return writer

    def _encode_rare(
        self, request: Decoded, outputs: dict[str, Any], numbers: Sequence[float], depth: int
    ) -> bytes:
        """A reply echoing a request id, or with outputs written into shared memory."""
        in_regions = b""
        if request.output_regions:  # written into shared memory, listed after the others
            outputs, in_regions = self.shared_memory.output_fields(outputs, request.output_regions)
        parameters: dict[str, Any] = dict(zip(_REPLY_DOUBLES, numbers, strict=True))
        parameters["energy_source"] = self.plane.cost.source
        parameters["queue_depth"] = depth
        data_out = encode_response(
            request.model.name,
            outputs,
            parameters=parameters,
            request_id=request.request_id,
            model_version=request.model.version_str,
        )
        return data_out + in_regions if in_regions else data_out


_REPLY_DOUBLES = ("compute_ms", "queue_ms", "energy_mj", "expected_wait_ms")
"""The reply's parameters that are numbers (besides ``energy_source`` and ``queue_depth``)."""


def _deadline(time_remaining: float | None, deadline_ms: float | None) -> float | None:
    """The request's deadline (monotonic seconds): the earlier of gRPC's and ``deadline_ms``."""
    if time_remaining is None and deadline_ms is None:
        return None
    now = time.monotonic()
    grpc_deadline = now + time_remaining if time_remaining is not None else float("inf")
    return min(grpc_deadline, now + deadline_ms / 1e3) if deadline_ms is not None else grpc_deadline


class NodeServicer(moesaic_pb2_grpc.NodeServicer):
    """``moesaic.v1.Node/Describe``: device, models and their measured profiles."""

    def __init__(
        self,
        node_id: str,
        device: DeviceInfo,
        plane: DataPlane,
        profiles: Sequence[ProfileRecord],
    ) -> None:
        self.node_id = node_id
        self.device = device
        self.plane = plane
        self.models: Mapping[str, ServedModel] = plane.models
        self.profiles = list(profiles)

    def Describe(self, request: Any, context: grpc.ServicerContext) -> Any:
        d = self.device
        idle = self.plane.cost.idle_watts
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
                idle_watts=0.0 if idle != idle else idle,  # NaN: not learnt yet
            ),
        )
        for model in list(self.models.values()):
            served = sorted(self.plane.versions.get(model.name, {}))
            desc = reply.models.add(
                name=model.name,
                task=model.spec.task,
                engine=model.engine_type,
                ready=model.ready,
                state=model.state,
                class_names=model.class_names,
                error=model.error,
                device=model.device,
                provider=model.provider,
                version=model.version_str,
                versions=[str(v) for v in served],
                input_format=model.input_format,
                synthetic=model.spec.synthetic,
                description=model.spec.description,
            )
            if model.ready:
                queue = self.plane.queue_state(model)
                desc.queue_depth, desc.expected_wait_ms = queue.depth, queue.expected_wait_s * 1e3
                desc.service_ms = queue.service_s * 1e3
                desc.energy_mj = self.plane.cost.energy_j(model.name) * 1e3
            records = [rec for rec in self.profiles if rec.model == model.name] or model.profiles
            for rec in records:
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


# ---------------------------------------------------------------- repository helpers


def _check_repository(name: str) -> None:
    if name:
        raise NotFound(
            f"repository {name!r}: this node has one repository; leave repository_name empty",
            reason="unknown_repository",
        )


_TRITON_DROPPED = ("platform", "backend")
"""Triton config keys a load config may carry that say nothing a moesaic node can change."""


def _load_config(parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``config`` parameter of a load request as model.yaml keys; Triton's forms of
    ``instance_group`` and ``dynamic_batching`` are translated. :class:`InvalidInput` naming
    what is wrong."""
    unknown = sorted(k for k in parameters if k != "config")
    if any(k.startswith("file:") for k in unknown):
        raise InvalidInput(
            "load: file overrides (file:...) are not supported; put the version folder in the "
            "node's repository and load it by name",
            reason="bad_config",
        )
    if unknown:
        raise InvalidInput(
            f"load: unknown parameters {unknown}; only 'config' is accepted", reason="bad_config"
        )
    if "config" not in parameters:
        return None
    text = parameters["config"].string_param
    try:
        config = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"load: config is not JSON: {exc}", reason="bad_config") from None
    if not isinstance(config, dict):
        raise InvalidInput("load: config must be a JSON object", reason="bad_config")
    out = {k: v for k, v in config.items() if k not in _TRITON_DROPPED}
    groups = out.pop("instance_group", None)
    if groups is not None:
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise InvalidInput("load: config: instance_group must be a list of objects", reason="bad_config")
        out["instances"] = sum(int(g.get("count", 1)) for g in groups) or 1
    batching = out.get("dynamic_batching")
    if isinstance(batching, dict) and (
        "max_queue_delay_microseconds" in batching or "preferred_batch_size" in batching
    ):
        translated: dict[str, Any] = {"max_batch_size": out.get("max_batch_size") or 1}
        if "max_queue_delay_microseconds" in batching:
            translated["max_queue_delay_us"] = int(batching["max_queue_delay_microseconds"])
        if batching.get("preferred_batch_size"):
            translated["preferred_batch_sizes"] = list(batching["preferred_batch_size"])
        out["dynamic_batching"] = translated
    return out


_DATA_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}


def model_config_of(model: ServedModel, served: Sequence[int]) -> Any:
    """Triton's ``ModelConfig`` of one served version; moesaic's own facts go in ``parameters``."""
    spec = model.spec
    pb = inference_pb2
    batch = spec.max_batch_size
    config = pb.ModelConfig(
        name=model.name,
        platform=_PLATFORMS.get(model.engine_type, model.engine_type),
        backend=_BACKENDS.get(model.engine_type, model.engine_type),
        max_batch_size=batch,
        default_model_filename=str(getattr(model.engine_config, "file", "") or ""),
    )
    policy = spec.version_policy
    if policy.all:
        config.version_policy.all.SetInParent()
    elif policy.specific is not None:
        config.version_policy.specific.versions.extend(policy.specific)
    else:
        config.version_policy.latest.num_versions = policy.latest or 1

    def dims(shape: Sequence[int]) -> list[int]:
        return list(shape[1:]) if batch and shape else list(shape)

    for tensor in model.inputs:
        config.input.add(
            name=tensor.name,
            data_type=_DATA_TYPES.get(tensor.datatype, "TYPE_INVALID"),
            dims=dims(tensor.shape),
        )
    for tensor in model.outputs:
        config.output.add(
            name=tensor.name,
            data_type=_DATA_TYPES.get(tensor.datatype, "TYPE_INVALID"),
            dims=dims(tensor.shape),
        )
    kind = "KIND_CPU" if model.device in ("", "cpu") else "KIND_GPU"
    group = config.instance_group.add(name=model.name, count=spec.instances, kind=kind)
    if model.device.startswith("cuda:"):
        group.gpus.append(int(model.device.split(":", 1)[1]))
    if spec.dynamic_batching is not None:
        db = spec.dynamic_batching
        config.dynamic_batching.max_queue_delay_microseconds = db.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(db.preferred_batch_sizes)
    facts = {
        "task": spec.task,
        "class_names": json.dumps(model.class_names),
        "input_format": model.input_format,
        "description": spec.description,
        "synthetic": "true" if spec.synthetic else "false",
        "version": model.version_str,
        "versions": ",".join(str(v) for v in served),
        "engine": model.engine_type,
        "device": model.device,
        "provider": model.provider,
    }
    for key, value in facts.items():
        config.parameters[key].string_value = value
    return config
