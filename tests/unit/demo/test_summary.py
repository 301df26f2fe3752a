"""The demo's figures: each frame ends as one result, error or drop per task; budget verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from moesaic.demo.summary import Ledger, Outcome, summarise

LIDAR = ("bev_segmentation", "bev_reconstruction")


def result(frame: int, task: str = "detection", sensor: str = "cam", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sensor": sensor,
        "task": task,
        "frame_id": frame,
        "latency_ms": 50.0,
        "energy_mj": 10.0,
        "budget": {"latency_ms": 100.0, "energy_mj": 0.0},
        "budget_met": True,
        "feasible": True,
        "energy_source": "estimate",
        "experts": [{"id": "yolo-n", "status": "ok"}],
    }
    body.update(extra)
    return body


@pytest.mark.parametrize(
    ("body", "feasible", "within"),
    [
        ({}, True, True),
        ({"latency_ms": 100.0}, True, True),  # at the budget is within it
        ({"latency_ms": 100.5}, True, False),
        ({"budget": {"latency_ms": 0.0, "energy_mj": 0.0}, "latency_ms": 9e9}, True, True),  # unbounded
        ({"budget": {"latency_ms": 0.0, "energy_mj": 5.0}}, True, False),  # 10 mJ over 5
        ({"budget": {"latency_ms": 0.0, "energy_mj": 10.0}}, True, True),
        ({"feasible": False, "budget_reason": "no_feasible_set"}, False, True),
        ({"feasible": None, "budget_met": False}, False, True),  # before results said feasible
        ({"feasible": None, "budget_met": True}, True, True),
    ],
)
def test_outcome_reads_the_budget_verdicts(body: dict[str, Any], feasible: bool, within: bool) -> None:
    message = result(1, **body)
    if body.get("feasible", True) is None:
        del message["feasible"]
    outcome = Outcome.of(message)
    assert (outcome.feasible, outcome.within_budget) == (feasible, within)


def ledger_with(events: list[tuple[str, dict[str, Any]]], frames: int = 4) -> Ledger:
    ledger = Ledger({"cam": ("detection",), "lidar": LIDAR})
    for i in range(1, frames + 1):
        ledger.published("cam", i)
        ledger.published("lidar", i)
    for kind, body in events:
        if kind == "result":
            ledger.result(body)
        else:
            ledger.error(body)
    return ledger


CASES = [
    pytest.param([], {"detection": (4, 0, 0, 4)}, id="nothing answered"),
    pytest.param(
        [("result", result(1)), ("result", result(2)), ("result", result(3)), ("result", result(4))],
        {"detection": (4, 4, 0, 0)},
        id="all answered",
    ),
    pytest.param(
        [("result", result(1)), ("result", result(1))],
        {"detection": (4, 1, 0, 3)},
        id="a redelivery counts once",
    ),
    pytest.param(
        [("result", result(9)), ("result", result(1, sensor="lidar"))],
        {"detection": (4, 0, 0, 4)},
        id="unknown frame or wrong sensor ignored",
    ),
    pytest.param(
        [
            (
                "error",
                {"sensor": "cam", "reason": "coordinator_unavailable", "task": "detection", "frame_id": 2},
            )
        ],
        {"detection": (4, 0, 1, 3)},
        id="error of one task",
    ),
    pytest.param(
        [("error", {"sensor": "lidar", "reason": "bad_payload", "frame_id": 3})],
        {"bev_segmentation": (4, 0, 1, 3), "bev_reconstruction": (4, 0, 1, 3), "detection": (4, 0, 0, 4)},
        id="error without a task counts for every task of the sensor",
    ),
    pytest.param(
        [
            ("result", result(2)),
            ("error", {"sensor": "cam", "task": "detection", "frame_id": 2, "reason": "x"}),
        ],
        {"detection": (4, 1, 0, 3)},
        id="a result wins over an error of the same frame",
    ),
    pytest.param(
        [("error", {"sensor": "cam", "reason": "bad_payload"})],
        {"detection": (4, 0, 0, 4)},
        id="error naming no frame is unattributed",
    ),
    pytest.param(
        [("result", result(1, task=t, sensor="lidar")) for t in LIDAR]
        + [("result", result(2, sensor="cam"))],
        {"bev_segmentation": (4, 1, 0, 3), "bev_reconstruction": (4, 1, 0, 3), "detection": (4, 1, 0, 3)},
        id="each task of a frame on its own",
    ),
]


@pytest.mark.parametrize(("events", "expected"), CASES)
def test_every_frame_is_a_result_an_error_or_dropped(
    events: list[tuple[str, dict[str, Any]]], expected: dict[str, tuple[int, int, int, int]]
) -> None:
    summary = summarise(ledger_with(events), duration_s=10.0, gates={"detection": "trained"})
    for task, (frames, results, errors, dropped) in expected.items():
        t = summary["tasks"][task]
        assert (t["frames"], t["results"], t["errors"], t["dropped"]) == (frames, results, errors, dropped)
    for t in summary["tasks"].values():
        assert t["results"] + t["errors"] + t["dropped"] == t["frames"]


@pytest.mark.parametrize(
    ("outcomes", "feasible", "within", "of_feasible"),
    [
        ([], 0, 0, None),
        ([{}, {}, {}, {}], 4, 4, 1.0),
        ([{}, {"latency_ms": 150.0}, {}, {}], 4, 3, 0.75),
        # an infeasible result over its budget counts in within_budget's denominator only
        ([{"feasible": False, "latency_ms": 150.0}, {}, {}, {}], 3, 3, 1.0),
        ([{"feasible": False}, {"feasible": False, "latency_ms": 150.0}], 0, 1, None),
        ([{}, {"latency_ms": 150.0}, {"feasible": False}], 2, 2, 0.5),
    ],
)
def test_within_budget_of_feasible(
    outcomes: list[dict[str, Any]], feasible: int, within: int, of_feasible: float | None
) -> None:
    ledger = ledger_with([("result", result(i + 1, **extra)) for i, extra in enumerate(outcomes)])
    t = summarise(ledger, duration_s=1.0, gates={})["tasks"]["detection"]
    assert (t["feasible"], t["within_budget"], t["within_budget_of_feasible"]) == (
        feasible,
        within,
        of_feasible,
    )
    assert t["gate"] == "prior"


def test_latency_energy_and_selections() -> None:
    events = [
        ("result", result(1, latency_ms=10.0, experts=[{"id": "yolo-n"}, {"id": "yolo-n-640"}])),
        ("result", result(2, latency_ms=20.0, energy_source="measured")),
        ("result", result(3, latency_ms=30.0, experts=[{"id": "yolo-n"}, {"id": "yolo-n"}])),  # failover
        ("result", result(4, latency_ms=40.0, budget_reason="deadline_missed")),
    ]
    t = summarise(ledger_with(events), duration_s=1.0, gates={"detection": "trained"})["tasks"]["detection"]
    assert t["latency_ms"] == {"mean": 25.0, "p50": 25.0, "p99": 39.7}
    assert t["energy_mj"] == {"mean": 10.0, "source": "mixed"}
    assert t["selections"] == {"yolo-n": 4, "yolo-n-640": 1}  # results that selected each expert
    assert t["budget_reasons"] == {"deadline_missed": 1}
    assert t["gate"] == "trained"


def test_figures_per_budget() -> None:
    tight = {"latency_ms": 30.0, "energy_mj": 0.0}
    events = [
        ("result", result(1, latency_ms=10.0)),
        ("result", result(2, latency_ms=20.0, budget=tight)),
        ("result", result(3, latency_ms=40.0, budget=tight, experts=[{"id": "yolo-n-640"}])),
    ]
    budgets = summarise(ledger_with(events), duration_s=1.0, gates={})["tasks"]["detection"]["budgets"]
    assert list(budgets) == ["30 ms, 0 mJ", "100 ms, 0 mJ"]
    assert budgets["30 ms, 0 mJ"] == {
        "results": 2,
        "feasible": 2,
        "within_budget": 1,
        "latency_ms_p50": 30.0,
        "energy_mj_p50": 10.0,
        "selections": {"yolo-n": 1, "yolo-n-640": 1},
    }
    assert budgets["100 ms, 0 mJ"]["within_budget"] == 1


def test_summary_keeps_the_bridge_counters_and_unattributed_errors() -> None:
    ledger = ledger_with([("error", {"sensor": "nobody", "reason": "bad_payload"})])
    summary = summarise(ledger, duration_s=3.456, gates={}, bridge={"frames_missing": 2.0})
    assert summary["duration_s"] == 3.46
    assert summary["bridge"] == {"frames_missing": 2.0, "unattributed_errors": {"bad_payload": 1}}
