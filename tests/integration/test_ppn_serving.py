"""Raw KITTI-layout LiDAR points sent to a real node come back as BEV segmentation and reconstruction.

A node on loopback serves the shipped experts ``models/ppn-seg-small`` and
``models/ppn-rec-small`` (ONNX Runtime, CPU). Scans of the bundled sample sequence (a track
the experts never saw in training) are sent as ``points`` FP32 [N, 4] with a ``sensor_id``;
both experts run concurrently on each frame, and their answers are checked against the
sequence's labels and dense obstacle map.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from moesaic.datasets import read_points
from moesaic.datasets.lidar_scenes import LidarSequence, bev_labels
from moesaic.models.ppn.encoding import PpnEncoding
from moesaic.nodes.client import NodeClient
from moesaic.nodes.server import NodeServer
from tests.helpers.nodes import running_node
from tests.helpers.real_data import REAL_DATA

ROOT = Path(__file__).resolve().parents[2]
EXPERTS = ("ppn-seg-small", "ppn-rec-small")
SAMPLE = ROOT / "moesaic" / "assets" / "sample_lidar"
KITTI = REAL_DATA / "kitti_000008.bin"


@pytest.fixture(scope="module")
def lidar_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeServer]:
    if not all((ROOT / "models" / name / "model.onnx").is_file() for name in EXPERTS):
        pytest.skip("the trained PPN experts are not in models/")
    repo = tmp_path_factory.mktemp("lidar-models")
    for name in EXPERTS:
        shutil.copytree(ROOT / "models" / name, repo / name, ignore=shutil.ignore_patterns("*.pt"))
    with running_node(repo, max_message_bytes=64 << 20) as node:
        yield node


async def test_points_in_segmentation_and_reconstruction_out(lidar_node: NodeServer) -> None:
    seq = LidarSequence(SAMPLE)
    encoding = PpnEncoding()  # the shipped experts' encoding
    async with NodeClient(lidar_node.address) as node:
        description = await node.describe(timeout=5)
        served = {m.name: m for m in description.models}
        assert set(EXPERTS) <= set(served)
        for i in range(len(seq)):
            points = seq.points(i)
            params = {"sensor_id": "sample_lidar"}
            seg, rec = await asyncio.gather(
                node.infer("ppn-seg-small", {"points": points}, parameters=params, timeout=30),
                node.infer("ppn-rec-small", {"points": points}, parameters=params, timeout=30),
            )
        probs = seg.outputs["probs"]
        dense = rec.outputs["bev"]
        assert probs.shape == (5, 256, 256) and probs.dtype == np.float32
        assert dense.shape == (1, 256, 256) and dense.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
        # the last frame, with a full ring buffer, against the truth
        last = len(seq) - 1
        truth = bev_labels(seq.points(last), seq.labels(last), encoding.grid)
        pred = probs.argmax(0)
        occupied = truth > 0
        assert (pred[occupied] == truth[occupied]).mean() > 0.9
        assert (pred[~occupied] == 0).mean() > 0.95
        target = seq.dense(last, encoding.grid) > 0.5
        hit = dense[0] >= 0.5
        iou = (hit & target).sum() / max(1, (hit | target).sum())
        assert iou > 0.3


async def test_real_kitti_scan_and_bad_points(lidar_node: NodeServer) -> None:
    if not KITTI.is_file():
        pytest.skip("real KITTI scan not present")
    points = read_points(KITTI)
    async with NodeClient(lidar_node.address) as node:
        result = await node.infer(
            "ppn-seg-small", {"points": points}, parameters={"sensor_id": "kitti"}, timeout=30
        )
        assert result.outputs["probs"].shape == (5, 256, 256)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.infer("ppn-rec-small", {"points": points[:, :3].copy()}, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "points" in (err.value.details() or "")
