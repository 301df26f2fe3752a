"""Validation at the node's boundary: a ``ModelInferRequest`` becomes checked tensors or an error.

Everything a client sends is checked here before any work: the model (and the version the
request names, if any) exists and is ready,
every input is one the model declares, with its datatype, a shape it accepts, bytes that match
the shape, a batch within ``max_batch_size``; floating-point inputs of point clouds
(``points``) hold finite values; requested outputs exist; ``deadline_ms`` is a positive
number. Every failure is :class:`~moesaic.errors.InvalidInput` (or ``NotFound`` /
``Unavailable`` for the model) naming the field. Decoding errors of the protobuf header are
``InvalidInput`` too: a mutated request is the client's fault, never INTERNAL.

Requests shaped like an earlier one take a fast path: a :class:`Plan` per header bytes (same
model, names, datatypes, shapes, parameters; no request id) skips protobuf parsing and the
per-input checks, leaving a length check and a view per input. Faster still, a
:class:`Layout` per message length says where that plan's tensors sit in the wire bytes: a
request of that length whose other bytes (header, tags, lengths) are the same is bound without
walking the message at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from moesaic.errors import InvalidInput, quote
from moesaic.nodes.codec import decode_tensor, from_parameters, tensor_from_contents
from moesaic.nodes.served import ServedModel
from moesaic.nodes.shm import RegionRef, SharedMemory, region_ref
from moesaic.nodes.wire import raw_spans, split_message
from moesaic.proto import inference_pb2

__all__ = ["DEADLINE_PARAMETER", "Decoded", "RequestValidator", "validate_inputs"]

DEADLINE_PARAMETER = "deadline_ms"
"""Request parameter: milliseconds the client will wait (for clients that cannot set a gRPC deadline)."""

POINT_INPUTS = frozenset({"points"})
"""Inputs holding point clouds: their values must be finite."""


Accepted = dict[tuple[str, str, tuple[int, ...]], tuple[np.dtype[Any], int]]
"""Input signatures (name, datatype, shape) already validated for one model: dtype, byte length."""

_ACCEPTED_LIMIT = 256


def validate_inputs(
    model: ServedModel, header: Any, raws: Sequence[memoryview], accepted: Accepted | None = None
) -> dict[str, np.ndarray]:
    """Input arrays of a request, checked against the model's inputs; :class:`InvalidInput` naming it.

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


def _check_inputs(
    model: ServedModel, header: Any, raws: Sequence[memoryview], shm: SharedMemory | None = None
) -> dict[str, np.ndarray]:
    specs = model.input_specs
    tensors = header.inputs
    # Inputs in shared memory take no raw_input_contents entry; the others take one each, in order.
    refs = [region_ref(t.parameters, f"input {quote(t.name)}") if t.parameters else None for t in tensors]
    travelling = sum(ref is None for ref in refs)
    if raws and len(raws) != travelling:
        raise InvalidInput(f"raw_input_contents holds {len(raws)} entries for {travelling} inputs")
    contents = iter(raws)
    max_batch = model.spec.max_batch_size
    out: dict[str, np.ndarray] = {}
    for tensor, ref in zip(tensors, refs, strict=True):
        name = tensor.name
        raw: Any = None
        if ref is not None:
            if shm is None:
                raise InvalidInput(f"input {quote(name)}: this server has no shared memory regions")
            raw = shm.read(ref, f"input {quote(name)}")
        elif raws:
            raw = next(contents)
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(
                f"input {quote(name)}: model {model.name!r} has no such input; expected {sorted(specs)}"
            )
        if name in out:
            raise InvalidInput(f"input {quote(name)}: given twice")
        shape = tuple(tensor.shape)
        if spec.encoded and tensor.datatype == "BYTES":  # one encoded image, decoded by the processor
            if shape != (1,):
                raise InvalidInput(
                    f"input {quote(name)}: BYTES shape {list(shape)}; expected [1] (one image)"
                )
            out[name] = (
                decode_tensor(name, "BYTES", shape, raw)
                if raw is not None
                else tensor_from_contents(name, "BYTES", shape, tensor.contents)
            )
            continue
        if tensor.datatype != spec.datatype:
            also = " (or BYTES [1]: an encoded JPEG/PNG)" if spec.encoded else ""
            given = tensor.datatype or "(empty)"
            raise InvalidInput(f"input {quote(name)}: datatype {given}; expected {spec.datatype}{also}")
        if not spec.accepts_shape(shape):
            raise InvalidInput(
                f"input {quote(name)}: shape {list(shape)}; expected {list(spec.shape)} (-1 = any size)"
            )
        if max_batch and shape and shape[0] > max_batch:
            raise InvalidInput(f"input {quote(name)}: batch {shape[0]} exceeds max_batch_size {max_batch}")
        if raw is not None:
            out[name] = decode_tensor(name, spec.datatype, shape, raw)
        else:
            out[name] = tensor_from_contents(name, spec.datatype, shape, tensor.contents)
    if len(out) != len(specs):
        missing = sorted(specs.keys() - out.keys())
        raise InvalidInput(f"inputs {missing} missing; model {model.name!r} needs {sorted(specs)}")
    return out


class Plan:
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
_NO_REGIONS: dict[str, RegionRef] = {}  # shared by every planned request (read only)


class Layout:
    """Where one plan's tensors sit in a request's wire bytes, for requests of one length.

    A message is a sequence of fields whose tags and lengths decide how it parses, so bytes of
    the same length that agree with the planned request everywhere outside its tensors' payloads
    parse to the same header and the same tensor positions: :meth:`bind` checks that with one
    ``startswith`` per constant run (one for a request with its tensors at the end) and reads
    each tensor with one ``np.frombuffer``.
    """

    __slots__ = (
        "deadline_ms",
        "model",
        "model_version",
        "parameters",
        "plan",
        "requested",
        "runs",
        "specs",
        "tensors",
    )

    def __init__(self, plan: Plan, data: bytes, spans: Sequence[tuple[int, int]]) -> None:
        self.plan = plan
        self.model = plan.model
        self.specs = plan.specs
        runs, pos = [], 0
        for start, end in spans:
            if start > pos:
                runs.append((data[pos:start], pos))
            pos = end
        if pos < len(data):
            runs.append((data[pos:], pos))
        self.runs = tuple(runs)
        self.tensors = tuple(
            (name, dtype, nbytes // dtype.itemsize, start, shape if len(shape) != 1 else None)
            for (name, dtype, shape, nbytes), (start, _) in zip(plan.tensors, spans, strict=True)
        )
        parameters = dict(plan.parameters) if plan.parameters else {}
        self.deadline_ms = _deadline_ms(parameters.pop(DEADLINE_PARAMETER, None)) if parameters else None
        self.parameters = parameters
        self.requested = plan.requested
        self.model_version = plan.model_version

    def bind(self, data: bytes) -> Decoded | None:
        """The request decoded, or None when it does not fit this layout (then parse it)."""
        model = self.model
        if model.state != "ready" or model.input_specs is not self.specs:
            return None
        for run, offset in self.runs:
            if not data.startswith(run, offset):
                return None
        inputs = {}
        for name, dtype, count, offset, shape in self.tensors:
            array = np.frombuffer(data, dtype, count, offset)
            inputs[name] = array if shape is None else array.reshape(shape)
        parameters = self.parameters
        return Decoded(
            model,
            inputs,
            dict(parameters) if parameters else {},
            self.requested,
            "",
            self.model_version,
            self.deadline_ms,
            _NO_REGIONS,
        )


@dataclass(slots=True)
class Decoded:
    """One request after validation: what the data plane needs, and what the reply echoes."""

    model: ServedModel
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    requested: Sequence[str]
    request_id: str
    model_version: str
    deadline_ms: float | None
    output_regions: dict[str, RegionRef] = field(default_factory=dict)
    """Requested outputs to write into shared-memory regions instead of the reply."""


class RequestValidator:
    """Turns ``ModelInfer`` wire bytes into a :class:`Decoded` request, caching what it learnt."""

    def __init__(
        self, ready_model: Callable[[str, str], ServedModel], shared_memory: SharedMemory | None = None
    ) -> None:
        self._ready_model = ready_model
        self._shm = shared_memory
        self._accepted: dict[str, tuple[Mapping[str, Any], Accepted]] = {}
        self._plans: dict[bytes, Plan] = {}
        self._layouts: dict[int, Layout] = {}

    def decode(self, data: bytes, raw_field: int) -> Decoded:
        layout = self._layouts.get(len(data))
        if layout is not None and type(data) is bytes:
            decoded = layout.bind(data)
            if decoded is not None:
                return decoded
        header_bytes, raws = split_message(data, raw_field)
        plan = self._plans.get(header_bytes)
        inputs = plan.bind(raws) if plan is not None else None
        if inputs is not None and plan is not None:
            parameters = dict(plan.parameters) if plan.parameters else {}
            requested: Sequence[str] = plan.requested
            request_id, model_version, model = "", plan.model_version, plan.model
        else:
            try:
                header = inference_pb2.ModelInferRequest.FromString(header_bytes)
            except DecodeError as exc:
                raise InvalidInput(f"malformed ModelInferRequest: {exc}", reason="malformed") from None
            model = self._ready_model(header.model_name, header.model_version)
            in_regions = any(t.parameters for t in header.inputs)
            if in_regions:  # shared memory (or other tensor parameters): checked in full, never planned
                inputs = _check_inputs(model, header, raws, self._shm)
            else:
                inputs = validate_inputs(model, header, raws, self._accepted_for(model))
            parameters = from_parameters(header.parameters) if header.parameters else {}
            requested = [out.name for out in header.outputs]
            request_id, model_version = header.id, header.model_version
            regions = _output_regions(header, self._shm)
            if not in_regions and not regions:
                plan = self._remember(header_bytes, header, model, inputs, raws)
                if plan is not None and type(data) is bytes and not POINT_INPUTS & inputs.keys():
                    spans = raw_spans(data, raw_field)
                    if len(spans) == len(plan.tensors):
                        layouts = self._layouts
                        if len(layouts) >= _PLAN_LIMIT:
                            layouts.clear()
                        layouts[len(data)] = Layout(plan, data, spans)
            else:
                return self._finish(model, inputs, parameters, requested, request_id, model_version, regions)
        return self._finish(model, inputs, parameters, requested, request_id, model_version, {})

    @staticmethod
    def _finish(
        model: ServedModel,
        inputs: dict[str, np.ndarray],
        parameters: dict[str, Any],
        requested: Sequence[str],
        request_id: str,
        model_version: str,
        regions: dict[str, RegionRef],
    ) -> Decoded:
        for name in POINT_INPUTS & inputs.keys():
            array = inputs[name]
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InvalidInput(f"input {name!r}: holds NaN or infinite values", reason="not_finite")
        deadline_ms = _deadline_ms(parameters.pop(DEADLINE_PARAMETER, None)) if parameters else None
        return Decoded(model, inputs, parameters, requested, request_id, model_version, deadline_ms, regions)

    def _accepted_for(self, model: ServedModel) -> Accepted:
        """The model's cache of validated input signatures (new after a reload)."""
        entry = self._accepted.get(model.name)
        if entry is None or entry[0] is not model.input_specs:
            entry = self._accepted[model.name] = (model.input_specs, {})
        return entry[1]

    def _remember(
        self,
        header_bytes: bytes,
        header: Any,
        model: ServedModel,
        inputs: Mapping[str, np.ndarray],
        raws: Any,
    ) -> Plan | None:
        """Keep a plan for requests with these header bytes (returned), if they can have one."""
        if (
            raws
            and not header.id
            and len(header_bytes) <= _PLAN_HEADER_BYTES
            and all(t.datatype != "BYTES" for t in header.inputs)
        ):
            plans = self._plans
            if len(plans) >= _PLAN_LIMIT:
                plans.clear()
            plan = plans[header_bytes] = Plan(model, header, inputs, raws)
            return plan
        return None


def _output_regions(header: Any, shm: SharedMemory | None) -> dict[str, RegionRef]:
    """Requested outputs that name a shared-memory region."""
    regions = {}
    for out in header.outputs:
        ref = region_ref(out.parameters, f"output {quote(out.name)}") if out.parameters else None
        if ref is not None:
            if shm is None:
                raise InvalidInput(f"output {quote(out.name)}: this server has no shared memory regions")
            regions[out.name] = ref
    return regions


def _deadline_ms(value: Any) -> float | None:
    if value is None:
        return None
    try:
        ms = float(value)
    except (TypeError, ValueError):
        ms = float("nan")
    if not ms > 0 or ms == float("inf"):
        raise InvalidInput(
            f"parameter {DEADLINE_PARAMETER!r}: expected milliseconds > 0, got {str(value)[:32]!r}",
            reason="bad_parameter",
        )
    return ms
