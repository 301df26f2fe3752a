"""`moesaic select`: the issue's problem/output JSON, flags, brute-force agreement, bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moesaic.cli import main
from moesaic.coordinator.problem import ProblemError, parse_problem
from moesaic.coordinator.selection import brute_force

OUTPUT_KEYS = {"selected", "loss", "latency_ms", "energy_mj", "feasible", "nodes_explored", "solve_ms"}


def problem_doc(rng: np.random.Generator, n: int = 6, samples: int = 20, classes: int = 3) -> dict[str, Any]:
    experts = [
        {
            "id": f"node{i % 3}/m{i}",
            "device": f"dev{i % 3}",
            "latency_ms": float(rng.uniform(2, 30)),
            "energy_mj": float(rng.uniform(5, 60)),
        }
        for i in range(n)
    ]
    rows = []
    for _ in range(samples):
        probs = rng.dirichlet(np.ones(classes), n)
        rows.append(
            {
                "label": int(rng.integers(0, classes)),
                "gate": rng.dirichlet(np.ones(n)).tolist(),
                "probs": probs.tolist(),
            }
        )
    return {
        "overhead_ms": 1.5,
        "experts": experts,
        "samples": rows,
        "budget": {"latency_ms": 40, "energy_mj": 90},
    }


def run_select(
    tmp_path: Path, doc: Any, *flags: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    path = tmp_path / "problem.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    code = main(["select", "--problem", str(path), *flags])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("seed", range(5))
def test_select_json_matches_brute_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int
) -> None:
    doc = problem_doc(np.random.default_rng(seed))
    code, out, _ = run_select(tmp_path, doc, "--json", capsys=capsys)
    assert code == 0
    result = json.loads(out)
    assert set(result) == OUTPUT_KEYS
    problem, budget = parse_problem(doc)
    reference = brute_force(problem, budget)
    assert result["loss"] == pytest.approx(reference.loss, abs=1e-9)
    assert result["feasible"] is True
    assert result["latency_ms"] <= 40 and result["energy_mj"] <= 90
    # Recompute the objective from the raw file: mean -log of the renormalised mixture.
    ids = [e["id"] for e in doc["experts"]]
    cols = [ids.index(s) for s in result["selected"]]
    losses = []
    for s in doc["samples"]:
        g = np.array(s["gate"])[cols]
        p = np.array([s["probs"][c][s["label"]] for c in cols])
        losses.append(-np.log((g * p).sum() / g.sum()))
    assert result["loss"] == pytest.approx(float(np.mean(losses)))


def test_flags_override_the_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = problem_doc(np.random.default_rng(3))
    code, out, _ = run_select(tmp_path, doc, "--json", "--energy-mj", "0", "--latency-ms", "0", capsys=capsys)
    unbounded = json.loads(out)
    code, out, _ = run_select(tmp_path, doc, "--json", "--energy-mj", "0.5", capsys=capsys)
    tiny = json.loads(out)
    assert code == 0 and unbounded["feasible"] and unbounded["loss"] <= tiny["loss"] + 1e-12
    assert tiny["feasible"] is False and len(tiny["selected"]) == 1  # cheapest expert, budget not met


def test_human_output_and_brute_force_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_select(tmp_path, problem_doc(np.random.default_rng(4)), "--brute-force", capsys=capsys)
    assert code == 0 and "selected" in out and "match True" in out


def test_budget_and_overhead_may_be_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = problem_doc(np.random.default_rng(5))
    del doc["budget"], doc["overhead_ms"]
    code, out, _ = run_select(tmp_path, doc, "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["feasible"]


def _mutate(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    target: Any = doc
    keys = path.split("/")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("experts/0/latency_ms", -1, r"experts\[0\]\.latency_ms"),
        ("experts/1/id", KeyError, r"experts\[1\]\.id: Field required"),
        ("experts/2/color", "red", r"experts\[2\]\.color: Extra inputs"),
        ("samples/3/gate", [0.5], r"samples\[3\]\.gate: expected 6 weights"),
        ("samples/0/probs", [[1.0]], r"samples\[0\]\.probs: expected 6 lists"),
        ("samples/2/label", 7, r"samples\[2\]\.label: 7 is not a class index"),
        ("samples/1/label", "x", r"samples\[1\]\.label"),
        ("budget/energy_mj", -5, r"budget\.energy_mj"),
        ("overhead_ms", "fast", r"overhead_ms"),
        ("samples", [], r"samples: List should have at least 1"),
    ],
)
def test_bad_problem_files_name_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str, value: Any, message: str
) -> None:
    doc = _mutate(problem_doc(np.random.default_rng(0)), path, value)
    code, out, err = run_select(tmp_path, doc, "--json", capsys=capsys)
    assert code == 2 and out == ""
    assert "problem.json" in err
    assert __import__("re").search(message, err), err


def test_bad_probability_and_gate_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = problem_doc(np.random.default_rng(0))
    doc["samples"][4]["probs"][2][1] = 1.5
    code, _, err = run_select(tmp_path, doc, capsys=capsys)
    assert code == 2 and "samples[4].probs[2][1]: expected a probability" in err
    doc = problem_doc(np.random.default_rng(0))
    doc["samples"][1]["gate"] = [0.0] * 6
    code, _, err = run_select(tmp_path, doc, capsys=capsys)
    assert code == 2 and "samples[1].gate: weights must not all be 0" in err
    doc = problem_doc(np.random.default_rng(0))
    doc["experts"][3]["id"] = doc["experts"][0]["id"]
    code, _, err = run_select(tmp_path, doc, capsys=capsys)
    assert code == 2 and "experts[3].id: duplicate" in err


def test_not_json_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_select(tmp_path, "{not json", capsys=capsys)
    assert code == 2 and "not valid JSON" in err
    code = main(["select", "--problem", str(tmp_path / "missing.json")])
    assert code == 2 and "cannot read" in capsys.readouterr().err
    with pytest.raises(ProblemError, match="top level"):
        parse_problem([1, 2])
