"""``<loc_*>`` parsing and quantisation (1000 bins)."""

from __future__ import annotations

import numpy as np
import pytest

from moesaic.models.florence2.model import check_prompt
from moesaic.models.florence2.parsing import clean_text, dequantize, parse_detections, quantize


def test_parse_groups_labels_and_boxes() -> None:
    text = (
        "</s><s>car<loc_52><loc_333><loc_932><loc_774>"
        "person<loc_10><loc_20><loc_30><loc_40><loc_50><loc_60><loc_70><loc_80></s>"
    )
    d = parse_detections(text, width=1000, height=500, class_names=("person",))
    assert d.labels == ("car", "person", "person")
    assert d.class_names == ("person", "car") and d.class_ids.tolist() == [1, 0, 0]
    np.testing.assert_allclose(d.boxes[0], [52.5, 166.75, 932.5, 387.25])
    assert d.to_json()[0]["class_name"] == "car"


def test_incomplete_and_inverted_boxes_are_dropped() -> None:
    assert len(parse_detections("car<loc_1><loc_2><loc_3>", width=10, height=10)) == 0
    assert len(parse_detections("car<loc_5><loc_5><loc_1><loc_9>", width=10, height=10)) == 0
    assert len(parse_detections("a caption without boxes", width=10, height=10)) == 0
    with pytest.raises(ValueError, match="image size"):
        parse_detections("", width=0, height=10)


def test_quantize_dequantize_round_trip_within_one_bin() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 440, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (50, 2))], 1)
    back = dequantize(quantize(boxes, 640, 480), 640, 480)
    assert np.abs(back[:, [0, 2]] - boxes[:, [0, 2]]).max() <= 0.64
    assert np.abs(back[:, [1, 3]] - boxes[:, [1, 3]]).max() <= 0.48


def test_clean_text_and_prompts() -> None:
    assert clean_text("</s><s>a car</s><pad>") == "a car"
    assert check_prompt("<OPEN_VOCABULARY_DETECTION> red car") == ("<OPEN_VOCABULARY_DETECTION>", "red car")
    assert check_prompt(" <CAPTION> ") == ("<CAPTION>", "")
    with pytest.raises(ValueError, match="needs the object"):
        check_prompt("<OPEN_VOCABULARY_DETECTION>")
    with pytest.raises(ValueError, match="takes no text"):
        check_prompt("<OD> cars")
    with pytest.raises(ValueError, match="expected one of"):
        check_prompt("find cars")
