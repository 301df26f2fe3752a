"""Letterbox, decode and NMS against their definitions and against OpenCV/torchvision."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from moesaic.models.detector.yolo_ops import (
    batched_nms,
    decode,
    letterbox,
    letterbox_reference,
    nms,
    resize_bilinear,
    scale_boxes,
    to_tensor,
)
from moesaic.runtime.engine import MissingExtraError
from tests.helpers.real_data import REAL_DATA


@pytest.mark.parametrize(("h", "w", "size"), [(375, 1242, 640), (100, 200, 64), (64, 64, 64), (30, 17, 416)])
def test_letterbox_geometry(h: int, w: int, size: int) -> None:
    img = np.full((h, w, 3), 200, np.uint8)
    out, info = letterbox(img, size)
    assert out.shape == (size, size, 3)
    # The image occupies exactly the unpadded area; padding is grey 114.
    uw, uh = round(w * min(size / h, size / w)), round(h * min(size / h, size / w))
    inner = out[info.pad_y : info.pad_y + uh, info.pad_x : info.pad_x + uw]
    assert (inner == 200).all()
    assert (out == 114).sum() == (size * size - uw * uh) * 3
    # A box over the whole letterboxed image area maps back to the whole original image.
    back = scale_boxes(np.array([[info.pad_x, info.pad_y, info.pad_x + uw, info.pad_y + uh]]), info)
    np.testing.assert_allclose(back[0], [0, 0, w, h], atol=1e-3)


def test_resize_is_bit_exact_with_opencv() -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (123, 301, 3), dtype=np.uint8)
    for width, height in ((640, 262), (77, 31), (301, 123), (333, 97), (1000, 1000)):
        ref = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(resize_bilinear(img, width, height), ref), (width, height)


def test_letterbox_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"image: expected \[H, W, 3\]"):
        letterbox(np.zeros((10, 10), np.uint8), 32)


def test_to_tensor_layout() -> None:
    img = np.zeros((4, 5, 3), np.uint8)
    img[..., 1] = 255
    t = to_tensor(img)
    assert t.shape == (1, 3, 4, 5) and t.dtype == np.float32
    assert t[0, 1].min() == 1.0 and t[0, 0].max() == 0.0


def test_decode_filters_picks_best_class_and_suppresses_per_class(yolo_head: Any) -> None:
    pred = yolo_head.prediction(
        [(50, 50, 20, 20), (51, 50, 20, 20), (50, 50, 20, 20), (10, 10, 4, 4)],
        [[0.9, 0.1], [0.8, 0.1], [0.1, 0.7], [0.1, 0.2]],
    )
    boxes, scores, cls = decode(pred, conf=0.25, iou=0.7)
    # Anchor 1 is a same-class duplicate of anchor 0; anchor 2 overlaps but is another class;
    # anchor 3 is under the threshold.
    assert cls.tolist() == [0, 1]
    np.testing.assert_allclose(scores, [0.9, 0.7])
    np.testing.assert_allclose(boxes[0], [40, 40, 60, 60])
    boxes, _, cls = decode(pred, conf=0.25, iou=0.7, agnostic=True)
    assert cls.tolist() == [0]
    assert len(decode(pred, conf=0.95)[0]) == 0


def test_decode_max_det_and_bad_shape(yolo_head: Any) -> None:
    pred = yolo_head.prediction(
        [(i * 30.0, 5, 10, 10) for i in range(10)], [[0.5 + i / 100, 0] for i in range(10)]
    )
    boxes, scores, _ = decode(pred, max_det=3)
    assert len(boxes) == 3 and scores[0] == pytest.approx(0.59)
    with pytest.raises(ValueError, match="prediction"):
        decode(np.zeros((2, 6, 3), np.float32))


def test_nms_matches_torchvision() -> None:
    torchvision = pytest.importorskip("torchvision")
    import torch

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, (300, 2))
    wh = rng.uniform(5, 60, (300, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    for iou in (0.3, 0.5, 0.7):
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        assert nms(boxes, scores, iou).tolist() == ref.tolist()


def _random_boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-20, 300, (n, 2))
    wh = rng.uniform(2, 80, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    return boxes, scores, rng.integers(0, 5, n)


@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("agnostic", [False, True])
def test_batched_nms_equals_the_numpy_oracle(iou: float, agnostic: bool) -> None:
    pytest.importorskip("cv2")
    boxes, scores, classes = _random_boxes(3000, 4)  # the 3,000-box case
    got = batched_nms(boxes, scores, None if agnostic else classes, iou)
    if agnostic:
        expected = nms(boxes, scores, iou)
    else:
        expected = nms(boxes + classes[:, None].astype(np.float32) * 1000.0, scores, iou)
    assert got.tolist() == expected.tolist()
    assert (
        batched_nms(boxes, scores, classes, iou, max_det=7).tolist()
        == batched_nms(boxes, scores, classes, iou)[:7].tolist()
    )


def test_batched_nms_matches_torchvision() -> None:
    torchvision = pytest.importorskip("torchvision")
    import torch

    boxes, scores, classes = _random_boxes(500, 5)
    ref = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), 0.5
    ).numpy()
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == ref.tolist()


def test_batched_nms_without_opencv_falls_back_to_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    boxes, scores, classes = _random_boxes(300, 6)
    with_cv2 = batched_nms(boxes, scores, classes, 0.6)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails
    assert batched_nms(boxes, scores, classes, 0.6).tolist() == with_cv2.tolist()
    assert len(batched_nms(boxes[:0], scores[:0], classes[:0], 0.6)) == 0


def test_letterbox_equals_the_numpy_oracle_on_a_real_kitti_frame() -> None:
    cv2 = pytest.importorskip("cv2")
    path = REAL_DATA / "kitti_000008.png"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    image = np.ascontiguousarray(cv2.imread(str(path))[..., ::-1])
    for size in (320, 640, (384, 640)):
        fast, info = letterbox(image, size)
        slow, info_slow = letterbox_reference(image, size)
        assert np.array_equal(fast, slow) and info == info_slow
    # A non-contiguous view (e.g. a crop) and an image already at the inner size.
    crop = image[10:300, 5:900]
    assert np.array_equal(letterbox(crop, 320)[0], letterbox_reference(crop, 320)[0])
    exact = np.ascontiguousarray(image[:97, :320])
    assert np.array_equal(letterbox(exact, 320)[0], letterbox_reference(exact, 320)[0])


def test_letterbox_without_opencv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MissingExtraError, match=r"moesaic\[cpu\]' or pip install 'moesaic\[gpu\]"):
        letterbox(np.zeros((10, 20, 3), np.uint8), 32)
