"""``moesaic coordinator``, ``moesaic select``, ``moesaic build-validation``, ``moesaic train-gate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _fail(command: str, message: str) -> int:
    print(f"moesaic {command}: error: {message}", file=sys.stderr)
    return 2


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "coordinator", help="serve moesaic.v1.Coordinator (Perceive) over a fleet of nodes"
    )
    p.add_argument("--config", type=Path, required=True, help="fleet config YAML")
    p.add_argument(
        "--listen", default="127.0.0.1:8500", help="HOST:PORT to serve on (default 127.0.0.1:8500)"
    )
    p.set_defaults(func=_coordinator)

    p = subparsers.add_parser("select", help="solve one MoE² expert-selection problem (exact, offline)")
    p.add_argument("--problem", type=Path, required=True, help="problem JSON (experts, samples, budget)")
    p.add_argument(
        "--latency-ms", type=float, default=None, help="latency budget; overrides the file's (0 = none)"
    )
    p.add_argument(
        "--energy-mj", type=float, default=None, help="energy budget; overrides the file's (0 = none)"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument(
        "--brute-force", action="store_true", help="also enumerate all subsets and check the optimum"
    )
    p.set_defaults(func=_select)

    p = subparsers.add_parser(
        "build-validation", help="run a fleet's experts on labelled .npz frames -> table"
    )
    p.add_argument("--config", type=Path, required=True, help="fleet config YAML (the nodes to run)")
    p.add_argument("--task", required=True, help="task whose experts to score")
    p.add_argument("--data", type=Path, required=True, help="folder of labelled .npz frames")
    p.add_argument("--out", type=Path, required=True, help="validation table to write (.npz)")
    p.add_argument("--expert", action="append", default=None, help="only this expert id (repeatable)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per expert call")
    p.set_defaults(func=_build_validation)

    p = subparsers.add_parser("train-gate", help="train a task's gate once on a validation table")
    p.add_argument("--table", type=Path, required=True, help="validation table (.npz)")
    p.add_argument("--out", type=Path, required=True, help="gate file to write (.json)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--l2", type=float, default=1e-3)
    p.set_defaults(func=_train_gate)


def _coordinator(args: argparse.Namespace) -> int:
    import asyncio

    from moesaic.coordinator.config import load_fleet
    from moesaic.coordinator.service import serve

    try:
        config = load_fleet(args.config)
    except ValueError as exc:
        return _fail("coordinator", str(exc))
    try:
        asyncio.run(serve(config, args.listen))
    except (ValueError, OSError) as exc:
        return _fail("coordinator", str(exc))
    return 0


def _select(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from moesaic.budget import Budget
    from moesaic.coordinator.problem import ProblemError, load_problem
    from moesaic.coordinator.selection import brute_force, solve

    try:
        problem, budget = load_problem(args.problem)
    except ProblemError as exc:
        return _fail("select", str(exc))
    flags = {"latency_ms": args.latency_ms, "energy_mj": args.energy_mj}
    try:
        budget = Budget.model_validate(
            {**budget.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
        )
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0])
        flag = "--" + field.replace("_", "-")
        return _fail("select", f"{flag}: expected a finite value >= 0, got {flags[field]}")
    result = solve(problem, budget)
    out = result.to_json()
    if args.brute_force:
        reference = brute_force(problem, budget)
        out["brute_force_loss"] = reference.loss
        out["matches_brute_force"] = abs(reference.loss - result.loss) <= 1e-9 * max(1.0, abs(reference.loss))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"selected      {', '.join(result.ids)}")
        print(f"loss          {result.loss:.6f}")
        print(f"latency_ms    {result.latency_ms:.3f}  (budget {budget.latency_ms or 'unbounded'})")
        print(f"energy_mj     {result.energy_mj:.3f}  (budget {budget.energy_mj or 'unbounded'})")
        print(f"feasible      {result.feasible}")
        print(
            f"nodes         {result.nodes_explored} of {2**problem.size - 1} subsets, "
            f"{result.solve_ms:.2f} ms"
        )
        if args.brute_force:
            print(f"brute force   loss {out['brute_force_loss']:.6f}, match {out['matches_brute_force']}")
    return 0


def _build_validation(args: argparse.Namespace) -> int:
    import asyncio

    from moesaic.coordinator.builder import build_validation
    from moesaic.coordinator.config import load_fleet

    try:
        config = load_fleet(args.config)
        table = asyncio.run(
            build_validation(config, args.task, args.data, timeout_s=args.timeout, experts=args.expert)
        )
    except (ValueError, LookupError) as exc:
        return _fail("build-validation", str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    table.save(args.out)
    print(
        f"{args.out}: {len(table.features)} frames, {len(table.frame)} rows, "
        f"experts {', '.join(table.experts)}"
    )
    return 0


def _train_gate(args: argparse.Namespace) -> int:
    import numpy as np

    from moesaic.coordinator.gate import Gate, mixture_loss, train_gate
    from moesaic.coordinator.validation import ValidationTable

    try:
        table = ValidationTable.load(args.table)
        gate = train_gate(table, steps=args.steps, l2=args.l2)
    except ValueError as exc:
        return _fail("train-gate", str(exc))
    gate.save(args.out)
    uniform = Gate.uniform(table.task, table.experts, table.input_kind)
    singles = [float(-np.log(np.maximum(table.q[:, i], 1e-12)).mean()) for i in range(len(table.experts))]
    best = int(np.argmin(singles))
    print(
        f"{args.out}: gate of {table.task!r} over {len(table.experts)} experts ({table.input_kind} features)"
    )
    print(
        f"mixture loss   trained gate {mixture_loss(gate, table):.4f}   "
        f"uniform {mixture_loss(uniform, table):.4f}"
    )
    print(f"best single    {table.experts[best]} {singles[best]:.4f}")
    return 0
