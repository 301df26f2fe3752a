"""Request validation's fast paths: a repeated request shape skips parsing, never correctness."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from moesaic.errors import InvalidInput, Unavailable
from moesaic.nodes.codec import encode_request
from moesaic.nodes.repository import scan_models
from moesaic.nodes.served import ServedModel
from moesaic.nodes.validation import RequestValidator
from moesaic.nodes.wire import RAW_INPUT_FIELD
from moesaic.proto import inference_pb2
from moesaic.runtime.devices import discover_device
from tests.helpers.onnx_models import write_identity_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    root: Path = tmp_path_factory.mktemp("models")
    write_identity_model(root, "pair", [("a", "FP32", (-1, 4)), ("b", "INT64", (-1,))])
    (served,) = scan_models(root)
    served.load(discover_device("cpu"))
    assert served.ready, served.error
    yield served
    served.close()


def _lookup(model: ServedModel) -> Callable[[str, str], ServedModel]:
    def ready_model(name: str, version: str = "") -> ServedModel:
        if name != model.name:
            raise InvalidInput(f"no model {name!r}")
        if model.state != "ready":
            raise Unavailable(f"model {name!r} is {model.state}")
        return model

    return ready_model


def _request(a: np.ndarray, b: np.ndarray, **kwargs: object) -> bytes:
    return encode_request("pair", {"a": a, "b": b}, **kwargs)  # type: ignore[arg-type]


def test_repeated_requests_read_their_own_tensors(model: ServedModel) -> None:
    validator = RequestValidator(_lookup(model))
    rng = np.random.default_rng(0)
    for i in range(4):
        a, b = rng.random((2, 4), dtype=np.float32), np.arange(3, dtype=np.int64) + i
        decoded = validator.decode(
            _request(a, b, parameters={"sensor_id": "s", "deadline_ms": 50.0}), RAW_INPUT_FIELD
        )
        np.testing.assert_array_equal(decoded.inputs["a"], a)
        np.testing.assert_array_equal(decoded.inputs["b"], b)
        assert decoded.inputs["a"].shape == (2, 4) and decoded.inputs["a"].dtype == np.float32
        assert decoded.parameters == {"sensor_id": "s"} and decoded.deadline_ms == 50.0
        decoded.parameters["sensor_id"] = "changed"  # a caller's change never leaks into the next
    assert len(validator._layouts) == 1  # the later requests took the layout


def test_same_length_with_another_header_is_parsed_again(model: ServedModel) -> None:
    validator = RequestValidator(_lookup(model))
    a, b = np.ones((1, 4), np.float32), np.zeros(2, np.int64)
    first = validator.decode(_request(a, b, parameters={"sensor_id": "s1"}), RAW_INPUT_FIELD)
    second = validator.decode(_request(a, b, parameters={"sensor_id": "s2"}), RAW_INPUT_FIELD)
    assert (first.parameters, second.parameters) == ({"sensor_id": "s1"}, {"sensor_id": "s2"})
    # Same length, but a's shape says (2, 2): the header differs, so the full check refuses it.
    req = inference_pb2.ModelInferRequest(model_name="pair")
    req.inputs.add(name="a", datatype="FP32", shape=[2, 2])
    req.inputs.add(name="b", datatype="INT64", shape=[2])
    req.parameters["sensor_id"].string_param = "s1"
    good = _request(a, b, parameters={"sensor_id": "s1"})
    bad = req.SerializeToString() + good[len(good) - (16 + 2 + 16 + 2) :]
    assert len(bad) == len(good) and bad != good
    with pytest.raises(InvalidInput, match="shape"):
        validator.decode(bad, RAW_INPUT_FIELD)


def test_tensors_anywhere_in_the_message(model: ServedModel) -> None:
    """Protobuf allows any field order: a layout of tensors before the header works too."""
    validator = RequestValidator(_lookup(model))
    req = inference_pb2.ModelInferRequest(model_name="pair")
    req.inputs.add(name="a", datatype="FP32", shape=[1, 4])
    req.inputs.add(name="b", datatype="INT64", shape=[1])
    for i in range(3):
        a, b = np.full((1, 4), i, np.float32), np.array([i], np.int64)
        tail = inference_pb2.ModelInferRequest(raw_input_contents=[a.tobytes(), b.tobytes()])
        data = tail.SerializeToString() + req.SerializeToString()
        decoded = validator.decode(data, RAW_INPUT_FIELD)
        np.testing.assert_array_equal(decoded.inputs["a"], a)
        np.testing.assert_array_equal(decoded.inputs["b"], b)
    assert len(validator._layouts) == 1


def test_a_model_that_is_not_ready_is_never_bound(model: ServedModel) -> None:
    validator = RequestValidator(_lookup(model))
    data = _request(np.ones((1, 4), np.float32), np.zeros(1, np.int64))
    validator.decode(data, RAW_INPUT_FIELD)
    model.state = "unloading"
    try:
        with pytest.raises(Unavailable):
            validator.decode(data, RAW_INPUT_FIELD)
    finally:
        model.state = "ready"
    assert validator.decode(data, RAW_INPUT_FIELD).model is model
