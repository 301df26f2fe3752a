"""One BEV orientation everywhere: the PNG of `moesaic bev` and the one the bridge publishes on
`moesaic/v1/results/{sensor}/{task}/png` show a scan the same way (forward up, left on the left).

The scan has one block of points ahead and to the left of the sensor and a smaller one behind
and to the right. A real bridge on mosquitto sends it to a coordinator that answers with the
scan's own PPN occupancy as its segmentation (class 1 = occupied, a perfect segmenter), so
both pictures must mark the same pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moesaic.cli import main
from moesaic.datasets.bev import ppn_occupancy
from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc
from tests.integration.conftest import serve_coordinator
from tests.integration.ingest.test_bridge_mosquitto import collecting, config_for, publish, running_bridge

pytestmark = pytest.mark.mqtt


class OccupancyCoordinator(moesaic_pb2_grpc.CoordinatorServicer):
    """Answers every LiDAR request with the PPN occupancy of its points as the class map."""

    async def Perceive(self, request, context):  # type: ignore[no-untyped-def]
        points = np.frombuffer(request.points.data, "<f4").reshape(-1, request.points.fields or 4)
        classes = ppn_occupancy(points).astype(np.uint8)
        reply = moesaic_pb2.PerceiveResponse(
            request_id=request.request_id, task=request.task, budget_met=True
        )
        reply.grid.CopyFrom(
            moesaic_pb2.Tensor(
                name="classes", datatype="UINT8", shape=list(classes.shape), data=classes.tobytes()
            )
        )
        return reply


def _scan() -> np.ndarray:
    rng = np.random.default_rng(0)
    front_left = np.column_stack([rng.uniform(10, 20, 4000), rng.uniform(5, 15, 4000)])
    rear_right = np.column_stack([rng.uniform(-20, -15, 500), rng.uniform(-10, -5, 500)])
    xy = np.vstack([front_left, rear_right])
    return np.column_stack([xy, np.full(len(xy), 0.5), np.ones(len(xy))]).astype("<f4")  # above ground


async def test_moesaic_bev_and_the_bridge_png_have_one_orientation(mosquitto, tmp_path: Path) -> None:
    scan = _scan()
    path = tmp_path / "scan.bin"
    scan.tofile(path)
    assert main(["bev", str(path), "--out", str(tmp_path / "bev.png"), "--mode", "ppn"]) == 0
    cli = np.asarray(Image.open(tmp_path / "bev.png").convert("RGB"))
    cli_mask = cli.sum(-1) > 0

    async with (
        serve_coordinator(OccupancyCoordinator()) as address,
        running_bridge(config_for(mosquitto, address)),
        collecting(mosquitto.url, "moesaic/v1/results/#") as results,
    ):
        await publish(mosquitto.url, ("moesaic/v1/sensors/roof/lidar/kitti-f32x4", scan.tobytes()))
        [message] = await results.wait_for("moesaic/v1/results/roof/bev_segmentation/png", timeout=30)
    bridge = np.asarray(Image.open(io.BytesIO(message.payload)).convert("RGB"))  # type: ignore[arg-type]
    background = bridge[0, 0]
    bridge_mask = np.any(bridge != background, axis=-1)

    assert cli_mask.shape == bridge_mask.shape
    assert cli_mask.sum() > 1000
    np.testing.assert_array_equal(cli_mask, bridge_mask)
    # forward up, left on the left: the big front-left block is in the top-left quadrant
    h, w = cli_mask.shape
    quadrants = {
        "top-left": cli_mask[: h // 2, : w // 2].sum(),
        "bottom-right": cli_mask[h // 2 :, w // 2 :].sum(),
        "other": cli_mask[: h // 2, w // 2 :].sum() + cli_mask[h // 2 :, : w // 2].sum(),
    }
    assert quadrants["top-left"] > 4 * quadrants["bottom-right"] > 0 and quadrants["other"] == 0
