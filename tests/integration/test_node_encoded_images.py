"""A camera frame may cross the wire encoded: ``image`` as BYTES [1] (JPEG or PNG), decoded on the node.

Real node on loopback serving the shipped yolo-n; the answer to the encoded frame is the answer to
the same frame decoded by the client; bad bytes, a wrong shape and an oversized image are
INVALID_ARGUMENT naming the input.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from moesaic.nodes.client import NodeClient
from tests.helpers.nodes import REPO_ROOT, running_node
from tests.helpers.real_data import REAL_DATA

cv2 = pytest.importorskip("cv2")


def _frames() -> list[np.ndarray]:
    """A generated 1242 x 375 frame, and the real KITTI frame when it is present."""
    yy, xx = np.mgrid[0:375, 0:1242]
    generated = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    frames = [generated]
    kitti = REAL_DATA / "kitti_000008.png"
    if kitti.is_file():
        frames.append(np.ascontiguousarray(cv2.imread(str(kitti))[..., ::-1]))
    return frames


def _encode(rgb: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return bytes(data)


@pytest.fixture(scope="module")
def yolo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO_ROOT / "models" / "yolo-n", root / "yolo-n")
    spec = root / "yolo-n" / "model.yaml"
    spec.write_text(spec.read_text().replace("  imgsz: 320\n", "  imgsz: 320\n  max_pixels: 1000000\n"))
    return root


async def _infer(address: str, inputs: dict[str, np.ndarray]) -> Any:
    async with NodeClient(address) as node:
        return await node.infer("yolo-n", inputs, timeout=30)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_an_encoded_frame_gets_the_answer_of_the_decoded_frame(yolo_repo: Path, ext: str) -> None:
    with running_node(yolo_repo) as node:
        for rgb in _frames():
            data = _encode(rgb, ext)
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            decoded = np.ascontiguousarray(bgr[..., ::-1])
            encoded_reply = asyncio.run(_infer(node.address, {"image": np.array([data], dtype=object)}))
            raw_reply = asyncio.run(_infer(node.address, {"image": decoded}))
            for name in ("boxes", "scores", "class_ids"):
                np.testing.assert_array_equal(encoded_reply.outputs[name], raw_reply.outputs[name])
            assert len(data) < decoded.nbytes  # what the encoding saves on the wire


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"image": np.array([b"not an image"], dtype=object)}, "not a JPEG or PNG"),
        ({"image": np.array([b"a", b"b"], dtype=object)}, r"BYTES shape \[2\]; expected \[1\]"),
        ({"image": np.array([b""], dtype=object)}, "not a JPEG or PNG"),
    ],
)
def test_bad_encoded_input_is_invalid_argument(yolo_repo: Path, inputs: dict[str, Any], message: str) -> None:
    with running_node(yolo_repo) as node, pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_infer(node.address, inputs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert "image" in details and re.search(message, details), details


def test_an_image_over_max_pixels_is_refused_before_decoding(yolo_repo: Path) -> None:
    big = _encode(np.zeros((1100, 1000, 3), np.uint8), ".png")  # 1.1 MP > max_pixels 1 MP
    with running_node(yolo_repo) as node, pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_infer(node.address, {"image": np.array([big], dtype=object)}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1000 x 1100 exceeds max_pixels=1000000" in (err.value.details() or "")
