"""Result JSON speaks the energy vocabulary of the rest of moesaic: a figure is measured, or an
``estimate`` (the word the nodes' energy sources, Describe and replies use)."""

from __future__ import annotations

import json

import pytest

from moesaic.ingest.payloads import Frame
from moesaic.ingest.results import result_json
from moesaic.proto import moesaic_pb2
from moesaic.runtime.energy import ENERGY_SOURCES


@pytest.mark.parametrize(("measured", "word"), [(True, "measured"), (False, "estimate")])
def test_result_energy_source_words(measured: bool, word: str) -> None:
    frame = Frame("s0", "camera", received=0.0, timestamp=1.0)
    response = moesaic_pb2.PerceiveResponse(task="detection", energy_measured=measured, budget_met=True)
    body = json.loads(result_json(frame, response, moesaic_pb2.Budget(), bridge_ms=1.0))
    assert body["energy_source"] == word
    assert word == "measured" or word in ENERGY_SOURCES  # never "estimated" here and "estimate" there
