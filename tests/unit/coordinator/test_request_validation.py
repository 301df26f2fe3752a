"""Perceive validation and MQTT payload parsing, property-based: whatever arrives, the answer is
the client's fault (a typed error naming what was wrong) or a valid request, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesaic.coordinator.service import to_domain
from moesaic.errors import MESSAGE_LIMIT, InvalidInput
from moesaic.ingest.payloads import PayloadError, decode_payload
from moesaic.proto import moesaic_pb2
from tests.helpers.images import png_bomb

TASKS = ["detection", "bev_segmentation", "bev_reconstruction", "vlm", "classification"]
FUZZ = settings(max_examples=400, deadline=None, derandomize=True)


@st.composite
def perceive_requests(draw: st.DrawFn) -> moesaic_pb2.PerceiveRequest:
    request = moesaic_pb2.PerceiveRequest(
        task=draw(st.one_of(st.sampled_from(TASKS), st.text(max_size=300))),
        budget=moesaic_pb2.Budget(
            latency_ms=draw(st.floats(allow_nan=True, allow_infinity=True)),
            energy_mj=draw(st.floats(allow_nan=True, allow_infinity=True)),
        ),
    )
    for key, value in draw(
        st.dictionaries(st.sampled_from(["slice", "overlap", "prompt", "x"]), st.text(max_size=8))
    ).items():
        request.options[key] = value
    kind = draw(st.sampled_from(["points", "image", "tensor", "none"]))
    data = draw(st.binary(max_size=256))
    if kind == "points":
        request.points.CopyFrom(moesaic_pb2.PointCloud(data=data, fields=draw(st.integers(-2, 8))))
    elif kind == "image":
        encoding = draw(st.sampled_from(["jpeg", "png", "rgb8", "gif", ""]))
        payload = draw(st.sampled_from([data, png_bomb(), png_bomb(300, 200)]))
        request.image.CopyFrom(
            moesaic_pb2.Image(
                data=payload,
                encoding=encoding,
                width=draw(st.integers(-5, 50)),
                height=draw(st.integers(-5, 50)),
            )
        )
    elif kind == "tensor":
        request.tensor.CopyFrom(
            moesaic_pb2.Tensor(
                name=draw(st.text(max_size=10)),
                datatype=draw(st.sampled_from(["FP32", "UINT8", "BYTES", "INT64", "NOPE"])),
                shape=draw(st.lists(st.integers(-3, 16), max_size=4)),
                data=data,
            )
        )
    return request


@FUZZ
@given(request=perceive_requests())
def test_perceive_validation_raises_only_invalid_input(request: moesaic_pb2.PerceiveRequest) -> None:
    try:
        to_domain(request)
    except InvalidInput as exc:
        assert exc.message and len(exc.message) <= MESSAGE_LIMIT and "Traceback" not in exc.message
        assert " at 0x" not in exc.message  # no object addresses


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": "red"}, "'colour' not understood by task 'detection'"),
        ({"slice": "huge"}, "options.slice"),
        ({"slice": "16"}, "[32, 8192]"),
        ({"slice": "320", "overlap": "0.95"}, "options.overlap"),
    ],
)
def test_options_are_checked_before_any_work(options: dict[str, str], message: str) -> None:
    request = moesaic_pb2.PerceiveRequest(task="detection", image=moesaic_pb2.Image(data=png_bomb(8, 8)))
    request.options.update(options)
    with pytest.raises(InvalidInput, match=message):
        to_domain(request)


@FUZZ
@given(
    kind=st.sampled_from(["lidar", "camera"]),
    payload=st.one_of(
        st.binary(max_size=512),
        st.builds(lambda b: b"\x89PNG\r\n\x1a\n" + b, st.binary(max_size=64)),
        st.builds(lambda b: b"\xff\xd8\xff" + b, st.binary(max_size=64)),
        st.builds(
            lambda frame_id, enc, data, w, h: moesaic_pb2.SensorFrame(
                frame_id=frame_id, encoding=enc, data=data, width=w, height=h
            ).SerializeToString(),
            st.integers(-5, 5),
            st.sampled_from(["kitti-f32x4", "nuscenes-f32x5", "jpeg", "png", "rgb8", "x"]),
            st.binary(max_size=128),
            st.integers(-10, 100),
            st.integers(-10, 100),
        ),
    ),
)
def test_payload_parsing_raises_only_payload_errors(kind: str, payload: bytes) -> None:
    try:
        frame = decode_payload("s", kind, payload, received=0.0)  # type: ignore[arg-type]
    except PayloadError as exc:
        assert exc.reason and str(exc) and " at 0x" not in str(exc)
        return
    assert (frame.points is not None) != (frame.image is not None)
    if frame.points is not None:
        assert np.isfinite(np.frombuffer(frame.points.data, "<f4")).all()
