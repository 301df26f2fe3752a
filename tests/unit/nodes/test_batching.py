"""The dynamic batcher on its own: which requests merge, when batches go, errors, deadlines, drain."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from moesaic.errors import Unavailable
from moesaic.nodes.batching import BatchShare, DynamicBatcher, DynamicBatchingConfig, check_batchable
from moesaic.runtime.engine import EngineDescription, EngineError, TensorSpec


class Recorder:
    """``run`` for a batcher: y = 2x (+ rows seen), remembering the first dimension of each call."""

    def __init__(self, fail_when: Callable[[np.ndarray], bool] | None = None) -> None:
        self.calls: list[int] = []
        self.fail_when = fail_when

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append(int(x.shape[0]))
        if self.fail_when is not None and self.fail_when(x):
            raise EngineError("engine exploded")
        return {"y": x * 2, "rows": np.full(x.shape[0], x.shape[0], np.int64)}


def _batcher(run: Any, **config: Any) -> DynamicBatcher:
    return DynamicBatcher("toy", run, DynamicBatchingConfig(**config))


def _submit_all(batcher: DynamicBatcher, arrays: Sequence[np.ndarray], timeout: float = 10) -> list[Any]:
    """Submit every array from its own thread at once; results (or exceptions) in order."""
    start = threading.Barrier(len(arrays))

    def one(x: np.ndarray) -> Any:
        start.wait()
        try:
            return batcher.submit({"x": x}, timeout)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(arrays)) as pool:
        return list(pool.map(one, arrays))


def test_concurrent_requests_merge_and_split_back_by_rows() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=6, max_queue_delay_us=5_000_000)
    arrays = [np.full((n, 2), i, np.float32) for i, n in enumerate([1, 2, 3])]
    try:
        shares = _submit_all(batcher, arrays)
    finally:
        batcher.close()
    assert run.calls == [6] and batcher.engine_calls == 1
    for x, share in zip(arrays, shares, strict=True):
        assert isinstance(share, BatchShare)
        np.testing.assert_array_equal(share.outputs["y"], x * 2)
        assert share.outputs["rows"].tolist() == [6] * len(x)
        assert (share.batch_rows, share.batch_requests) == (6, 3)
    assert sum(s.seconds for s in shares) == pytest.approx(shares[2].seconds * 2)  # 1:2:3 rows


@pytest.mark.parametrize(
    ("arrays", "expected_calls"),
    [
        ([np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32)], [1, 1]),  # other shape
        ([np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float64)], [1, 1]),  # other dtype
        ([np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)], [2]),
    ],
    ids=["shape", "dtype", "same"],
)
def test_only_equal_shapes_and_dtypes_merge(arrays: list[np.ndarray], expected_calls: list[int]) -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_us=300_000)
    try:
        shares = _submit_all(batcher, arrays)
    finally:
        batcher.close()
    assert sorted(run.calls) == expected_calls
    for x, share in zip(arrays, shares, strict=True):
        assert share.outputs["y"].dtype == x.dtype and share.outputs["y"].shape == x.shape


def test_preferred_batch_size_goes_without_waiting_out_the_delay() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_us=20_000_000, preferred_batch_sizes=[2])
    started = time.monotonic()
    try:
        shares = _submit_all(batcher, [np.ones((1, 2), np.float32)] * 2)
    finally:
        batcher.close()
    assert time.monotonic() - started < 10
    assert run.calls == [2] and all(s.batch_rows == 2 for s in shares)


def test_a_request_larger_than_max_batch_size_runs_alone() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=2, max_queue_delay_us=0)
    try:
        share = batcher.submit({"x": np.ones((5, 2), np.float32)}, 10)
    finally:
        batcher.close()
    assert run.calls == [5] and share.outputs["y"].shape == (5, 2)


def test_a_failing_batch_fails_every_member() -> None:
    run = Recorder(fail_when=lambda x: bool((x < 0).any()))
    batcher = _batcher(run, max_batch_size=3, max_queue_delay_us=5_000_000)
    arrays = [np.ones((1, 2), np.float32), -np.ones((1, 2), np.float32), np.ones((1, 2), np.float32)]
    try:
        results = _submit_all(batcher, arrays)
        assert run.calls == [3]
        for result in results:
            assert isinstance(result, EngineError)
            assert "batch of 3 requests (3 rows) failed: engine exploded" in str(result)
        # the batcher keeps serving afterwards
        assert batcher.submit({"x": np.ones((3, 2), np.float32)}, 10).batch_rows == 3
    finally:
        batcher.close()


def test_a_lone_failing_request_keeps_its_own_error() -> None:
    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise ValueError("input 'x': bad values")

    batcher = _batcher(run, max_batch_size=4, max_queue_delay_us=0)
    try:
        with pytest.raises(ValueError, match="input 'x': bad values"):
            batcher.submit({"x": np.ones((1, 2), np.float32)}, 10)
    finally:
        batcher.close()


def test_outputs_without_batch_rows_fail_the_batch() -> None:
    batcher = _batcher(
        lambda inputs: {"total": np.float32(inputs["x"].sum())},
        max_batch_size=2,
        max_queue_delay_us=5_000_000,
    )
    try:
        results = _submit_all(batcher, [np.ones((1, 2), np.float32)] * 2)
    finally:
        batcher.close()
    assert all(isinstance(r, EngineError) and "output 'total'" in str(r) for r in results)


def test_deadline_passing_in_the_queue_takes_the_request_out() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_us=20_000_000)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"deadline passed after .* ms in the batch queue"):
            batcher.submit({"x": np.ones((1, 2), np.float32)}, 0.2)
        assert 0.15 < time.monotonic() - started < 5
        assert batcher.queued() == 0
    finally:
        batcher.close()
    assert run.calls == []  # it never reached the engine, not even on close


def test_drain_sends_queued_requests_at_once_and_close_refuses_new_ones() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_us=20_000_000)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(batcher.submit, {"x": np.ones((1, 2), np.float32)}, 30)
        deadline = time.monotonic() + 5
        while batcher.queued() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        batcher.drain()
        assert future.result(timeout=5).batch_rows == 1
    batcher.close()
    with pytest.raises(Unavailable, match="stopping"):
        batcher.submit({"x": np.ones((1, 2), np.float32)}, 1)


def test_config_validation() -> None:
    assert DynamicBatchingConfig(max_batch_size=8, preferred_batch_sizes=[8, 4, 4]).preferred_batch_sizes == [
        4,
        8,
    ]
    with pytest.raises(
        ValidationError, match=r"preferred_batch_sizes: \[16\] outside 1..max_batch_size \(8\)"
    ):
        DynamicBatchingConfig(max_batch_size=8, preferred_batch_sizes=[16])
    with pytest.raises(ValidationError, match="max_batch_size"):
        DynamicBatchingConfig(max_batch_size=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        DynamicBatchingConfig.model_validate({"max_queue_delay": 5})


def _description(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> EngineDescription:
    return EngineDescription("numpy", "cpu", tuple(inputs), tuple(outputs))


@pytest.mark.parametrize(
    ("description", "run", "message"),
    [
        (
            _description([TensorSpec("x", "FP32", (1, 4))], [TensorSpec("y", "FP32", (1, 4))]),
            lambda f: {"y": f["x"]},
            "engine input 'x' has shape [1, 4]",
        ),
        (
            _description([TensorSpec("x", "FP32", (-1, 4))], [TensorSpec("total", "FP32", ())]),
            lambda f: {"total": f["x"].sum()},
            "engine output 'total' has shape []",
        ),
        (
            _description([TensorSpec("img", "UINT8", (-1, -1, 3))], [TensorSpec("boxes", "FP32", (-1, 4))]),
            lambda f: {"boxes": np.zeros((3, 4), np.float32)},
            "engine output 'boxes' has shape [3, 4] for an input batch of 1",
        ),
        (
            _description([TensorSpec("x", "FP32", (-1, 4))], [TensorSpec("y", "FP32", (-1, 4))]),
            lambda f: 1 / 0,
            "the engine failed a probe with batch 1: division by zero",
        ),
    ],
    ids=["fixed-input", "scalar-output", "outputs-not-per-row", "probe-fails"],
)
def test_check_batchable_names_the_problem(description: EngineDescription, run: Any, message: str) -> None:
    with pytest.raises(ValueError, match=r"^m/model\.yaml: dynamic_batching: ") as info:
        check_batchable(description, run, "m/model.yaml: dynamic_batching")
    assert message in str(info.value)


def test_check_batchable_accepts_a_batching_engine() -> None:
    description = _description(
        [TensorSpec("x", "FP32", (-1, -1)), TensorSpec("s", "BYTES", (-1,))],
        [TensorSpec("y", "FP32", (-1, -1))],
    )
    check_batchable(description, lambda f: {"y": f["x"] * 2}, "m")


def test_a_group_still_gathering_does_not_hold_back_another_shape() -> None:
    run = Recorder()
    batcher = _batcher(run, max_batch_size=8, max_queue_delay_us=20_000_000, preferred_batch_sizes=[2])
    with ThreadPoolExecutor(1) as pool:
        lonely = pool.submit(batcher.submit, {"x": np.ones((1, 2), np.float32)}, 30)  # waits for a partner
        deadline = time.monotonic() + 5
        while batcher.queued() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        shares = _submit_all(batcher, [np.ones((1, 3), np.float32)] * 2)  # another shape, a pair
        assert [s.batch_rows for s in shares] == [2, 2] and not lonely.done()
        batcher.drain()
        assert lonely.result(timeout=5).batch_rows == 1
    batcher.close()
    assert run.calls == [2, 1]
