"""Camera experts behind a real node on loopback: the shipped YOLO model (ONNX Runtime, CPU)
and a tiny Florence-2 built offline; answers equal local inference, bad input is
INVALID_ARGUMENT and the node keeps serving; tiles fanned out over two nodes merge to the
single-process sliced result."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from moesaic.datasets.intersection import CLASS_NAMES, render_scene
from moesaic.models.detector.detector import load_detector
from moesaic.models.detector.slicing import Tile, merge_tiles, sliced_detect, tile_image
from moesaic.nodes.client import NodeClient
from moesaic.nodes.server import NodeServer
from moesaic.runtime.detections import Detections
from tests.helpers.nodes import REPO_ROOT, running_node

YOLO = REPO_ROOT / "models" / "yolo-n"
pytestmark = pytest.mark.skipif(not (YOLO / "model.onnx").is_file(), reason="models/yolo-n not present")


@pytest.fixture(scope="module")
def camera_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("camera-models")
    shutil.copytree(YOLO, root / "yolo-n")
    from moesaic.models.florence2.tiny import build_tiny_florence2

    folder = root / "florence2-tiny"
    build_tiny_florence2(folder / "weights")
    spec = {
        "task": "vlm",
        "engine": {"type": "florence2", "weights": "weights", "max_new_tokens": 16, "threads": 1},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture(scope="module")
def camera_node(camera_repo: Path) -> Iterator[NodeServer]:
    with running_node(camera_repo, max_message_bytes=16 << 20) as node:
        yield node


def _frame(size: int = 416, seed: int = 3) -> np.ndarray:
    return render_scene(np.random.default_rng(seed), size=size).image


async def test_yolo_expert_answers_like_local_inference(camera_node: NodeServer) -> None:
    image = _frame()
    with load_detector(YOLO) as local:
        expected = local.detect(image)
    async with NodeClient(camera_node.address) as client:
        desc = await client.describe(timeout=5)
        models = {m.name: m for m in desc.models}
        assert models["yolo-n"].task == "detection" and models["yolo-n"].state == "ready"
        assert tuple(models["yolo-n"].class_names) == CLASS_NAMES
        meta = await client.metadata("yolo-n", timeout=5)
        assert [(t.name, t.datatype) for t in meta.inputs] == [("image", "UINT8")]
        out = (await client.infer("yolo-n", {"image": image}, timeout=30)).outputs
    assert out["boxes"].dtype == np.float32 and out["class_ids"].dtype == np.int64
    np.testing.assert_allclose(out["boxes"], expected.boxes, atol=1e-3)
    np.testing.assert_allclose(out["scores"], expected.scores, atol=1e-5)
    assert out["class_ids"].tolist() == expected.class_ids.tolist()


async def test_bad_image_is_invalid_argument_and_node_keeps_serving(camera_node: NodeServer) -> None:
    async with NodeClient(camera_node.address) as client:
        for bad, match in (
            ({"image": np.zeros((8, 8, 3), np.float32)}, "image"),
            ({"image": np.zeros((8, 8, 4), np.uint8)}, "image"),
            ({"picture": np.zeros((8, 8, 3), np.uint8)}, "image"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.infer("yolo-n", bad, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in (
                info.value.details() or ""
            )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("yolo-n", {"image": _frame()}, parameters={"conf": "high"}, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await client.infer("yolo-n", {"image": _frame(64)}, timeout=30)).outputs["boxes"].shape[
            1
        ] == 4


async def test_florence2_expert_through_the_node(camera_node: NodeServer, camera_repo: Path) -> None:
    from moesaic.models.florence2.model import Florence2Expert

    image = _frame(96)
    local = Florence2Expert(camera_repo / "florence2-tiny" / "weights", max_new_tokens=16)
    local.load()
    expected = local.run(image, "<OD>")
    async with NodeClient(camera_node.address) as client:
        desc = await client.describe(timeout=5)
        assert {m.name: m.task for m in desc.models}["florence2-tiny"] == "vlm"
        prompt = np.array([b"<OD>"], dtype=object)
        out = (await client.infer("florence2-tiny", {"image": image, "prompt": prompt}, timeout=60)).outputs
        assert out["text"][0] == expected.text.encode()
        np.testing.assert_allclose(out["boxes"], expected.detections.boxes, atol=1e-3)
        assert len(out["labels"]) == len(expected.detections)
        caption = await client.infer(
            "florence2-tiny", {"image": image, "prompt": np.array([b"<CAPTION>"], dtype=object)}, timeout=60
        )
        assert caption.outputs["boxes"].shape == (0, 4)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer(
                "florence2-tiny", {"image": image, "prompt": np.array([b"tell me"], dtype=object)}, timeout=30
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in (
            info.value.details() or ""
        )


async def test_tiles_over_two_nodes_merge_like_one_process(
    camera_node: NodeServer, camera_repo: Path
) -> None:
    frame = _frame(800, seed=11)
    with load_detector(YOLO) as local:
        expected = sliced_detect(local.detect, frame, 416, overlap=0.2)
    assert len(expected) > 0, "the shipped detector finds nothing in a generated frame"
    with running_node(camera_repo) as second:
        async with NodeClient(camera_node.address) as a, NodeClient(second.address) as b:
            queue: asyncio.Queue[Tile] = asyncio.Queue()
            for t in tile_image(frame, 416, 0.2):
                queue.put_nowait(t)
            results: list[tuple[Tile, Detections]] = []
            served = {a: 0, b: 0}

            async def worker(client: NodeClient) -> None:
                while not queue.empty():
                    t = queue.get_nowait()
                    o = (
                        await client.infer("yolo-n", {"image": np.ascontiguousarray(t.image)}, timeout=30)
                    ).outputs
                    results.append((t, Detections(o["boxes"], o["scores"], o["class_ids"], CLASS_NAMES)))
                    served[client] += 1

            await asyncio.gather(worker(a), worker(b))
    merged = merge_tiles(results, iou=0.5)
    assert all(n > 0 for n in served.values())
    order = lambda d: np.lexsort((d.boxes[:, 1], d.boxes[:, 0]))  # noqa: E731
    np.testing.assert_allclose(merged.boxes[order(merged)], expected.boxes[order(expected)], atol=1e-3)
