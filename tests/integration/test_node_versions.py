"""Model versions and the repository extension on a real node: Triton-style version folders,
version policies, tritonclient driving index/load/unload/config, swaps under a steady request
stream with no failed request, a corrupt version that leaves the old one serving, --watch,
and the coordinator's registry starting a fresh profile for a new version."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from moesaic.coordinator.config import parse_fleet
from moesaic.coordinator.registry import Registry
from moesaic.nodes.codec import decode_response, encode_request
from moesaic.nodes.server import NodeServer
from moesaic.proto import inference_pb2, inference_pb2_grpc
from tests.helpers.nodes import REPO_ROOT, running_node
from tests.helpers.onnx_models import write_offset_model

INFER = "/inference.GRPCInferenceService/ModelInfer"
TRITON = REPO_ROOT / "tests" / "helpers" / "triton_repository.py"
needs_tritonclient = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None, reason="tritonclient[grpc] is a dev dependency"
)


def _triton(address: str, steps: list[list[Any]], tmp_path: Path) -> list[Any]:
    """Run ``steps`` with tritonclient in its own process (see tests/helpers/triton_repository.py)."""
    path = tmp_path / "steps.json"
    path.write_text(json.dumps(steps))
    proc = subprocess.run(
        [sys.executable, str(TRITON), address, str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def _add_version(model: Path, version: int, offset: float | None = None, *, corrupt: bool = False) -> None:
    """Put version folder ``model/version`` in place at once (written aside, then renamed)."""
    staging = model.parent / f".staging-{model.name}-{version}"
    if corrupt:
        staging.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(b"\x08\x07 this is not an ONNX model")
    else:
        write_offset_model(staging, float(version if offset is None else offset))
    os.replace(staging, model / str(version))


def _stub(node: NodeServer) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(node.address)
    return channel, inference_pb2_grpc.GRPCInferenceServiceStub(channel)


def _index(node: NodeServer) -> dict[tuple[str, str], tuple[str, str]]:
    channel, stub = _stub(node)
    with channel:
        reply = stub.RepositoryIndex(inference_pb2.RepositoryIndexRequest(), timeout=10)
    return {(m.name, m.version): (m.state, m.reason) for m in reply.models}


@dataclass
class Stream:
    """``threads`` clients each sending one request after another to ``model`` until stopped;
    every reply (version, x, y, seconds) and every error is kept, per client in order."""

    address: str
    model: str
    threads: int = 3
    replies: list[list[tuple[str, float, float, float]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Stream:
        for i in range(self.threads):
            self.replies.append([])
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            self._workers.append(worker)
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def _run(self, i: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            call = channel.unary_unary(INFER)
            k = 0
            while not self._stop.is_set():
                k += 1
                x = float(i * 100_000 + k)
                t0 = time.perf_counter()
                try:
                    data = call(encode_request(self.model, {"x": np.full((1, 4), x, np.float32)}), timeout=30)
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                header, outputs = decode_response(data)
                took = time.perf_counter() - t0
                self.replies[i].append((header.model_version, x, float(outputs["y"][0, 0]), took))

    def count(self, version: str) -> int:
        return sum(r[0] == version for rs in list(self.replies) for r in list(rs))

    def wait_for(self, what: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, f"timed out; errors: {self.errors[:3]}"
            assert not self.errors, self.errors[:3]
            time.sleep(0.02)

    def all(self) -> list[tuple[str, float, float, float]]:
        return [r for rs in self.replies for r in rs]


def _assert_consistent(stream: Stream, offsets: dict[str, float]) -> None:
    """Each reply's values come from the version it names; each client never goes back a version."""
    for replies in stream.replies:
        seen = [int(v) for v, *_ in replies]
        assert seen == sorted(seen), "a client got an older version after a newer one"
        for version, x, y, _ in replies:
            assert y == x + offsets[version], (version, x, y)


# ---------------------------------------------------------------- versions and policies


@needs_tritonclient
def test_triton_layout_serves_the_latest_version_and_refuses_unknown_ones(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_offset_model(repo / "affine" / "1", 1.0)
    write_offset_model(repo / "affine" / "2", 2.0)
    write_offset_model(repo / "pair" / "1", 10.0)
    write_offset_model(repo / "pair" / "3", 30.0)
    (repo / "pair" / "model.yaml").write_text("version_policy: {latest: 2}\n")
    (repo / "notes").mkdir()  # no model files: skipped with a warning
    x = [[1.0, 2.0, 3.0, 4.0]]
    with running_node(repo) as node:
        out = _triton(
            node.address,
            [
                ["ready", "affine", ""],
                ["ready", "affine", "2"],
                ["ready", "affine", "1"],
                ["ready", "affine", "99"],
                ["infer", "affine", "", x],
                ["infer", "affine", "99", x],
                ["infer", "pair", "1", x],
                ["infer", "pair", "", x],
                ["metadata", "pair", ""],
                ["index"],
            ],
            tmp_path,
        )
    assert out[:4] == [True, True, False, False]
    assert out[4] == {"version": "2", "y": [[3.0, 4.0, 5.0, 6.0]]}
    assert out[5]["error"] == "StatusCode.NOT_FOUND"
    assert "version '99' not found; served versions: [2]" in out[5]["message"]
    assert out[6] == {"version": "1", "y": [[11.0, 12.0, 13.0, 14.0]]}
    assert out[7]["version"] == "3"
    assert out[8]["versions"] == ["1", "3"]
    index = {(m["name"], m.get("version", "")): (m.get("state"), m.get("reason", "")) for m in out[9]}
    assert index == {
        ("affine", "1"): ("UNAVAILABLE", "not in the version policy (latest 1)"),
        ("affine", "2"): ("READY", ""),
        ("pair", "1"): ("READY", ""),
        ("pair", "3"): ("READY", ""),
    }


def test_describe_carries_version_and_model_facts(tmp_path: Path) -> None:
    from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc

    repo = tmp_path / "repo"
    write_offset_model(
        repo / "flat",
        1.0,
        model_yaml="task: test\ndescription: trained on generated frames\nsynthetic: true\n"
        "class_names: [a, b]\n",
    )
    with running_node(repo) as node, grpc.insecure_channel(node.address) as channel:
        desc = moesaic_pb2_grpc.NodeStub(channel).Describe(moesaic_pb2.DescribeRequest(), timeout=10)
    (model,) = desc.models
    assert (model.version, list(model.versions), model.synthetic) == ("1", ["1"], True)
    assert model.description == "trained on generated frames"
    assert model.input_format == "x: FP32 [-1, 4]"


# ---------------------------------------------------------------- tritonclient drives the repository


@needs_tritonclient
def test_tritonclient_drives_index_load_unload_and_config(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_offset_model(repo / "add" / "1", 1.0)
    write_offset_model(repo / "add" / "2", 2.0)
    (repo / "add" / "model.yaml").write_text("task: test\nclass_names: [thing]\nmax_batch_size: 8\n")
    x = [[0.0, 0.0, 0.0, 0.0]]
    with running_node(repo) as node:
        out = _triton(
            node.address,
            [
                ["server_metadata"],
                ["unload", "add"],
                ["ready", "add", ""],
                ["index"],
                ["infer", "add", "", x],
                ["load", "add", None],
                ["infer", "add", "", x],
                ["load", "add", json.dumps({"version_policy": {"specific": {"versions": [1]}}})],
                ["infer", "add", "", x],
                ["config", "add", ""],
                ["load", "add", json.dumps({"max_batch_size": -3})],
                ["load", "nope", None],
                ["index_ready"],
            ],
            tmp_path,
        )
        node.lifecycle.wait_retired(10)
    assert {"model_repository", "model_configuration"} <= set(out[0]["extensions"])
    assert out[1] == "ok" and out[2] is False
    assert {m.get("reason") for m in out[3]} == {"unloaded"}
    assert out[4]["error"] == "StatusCode.NOT_FOUND"
    assert out[5] == "ok" and out[6]["version"] == "2"
    assert out[7] == "ok" and out[8] == {"version": "1", "y": [[1.0, 1.0, 1.0, 1.0]]}
    config = out[9]
    assert config["name"] == "add" and config["max_batch_size"] == 8
    assert config["version_policy"] == {"specific": {"versions": ["1"]}}
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["4"]}]
    params = {k: v.get("string_value", "") for k, v in config["parameters"].items()}
    assert params["task"] == "test" and json.loads(params["class_names"]) == ["thing"]
    assert params["version"] == "1" and params["synthetic"] == "false"
    assert out[10]["error"] == "StatusCode.INVALID_ARGUMENT"
    assert "max_batch_size" in out[10]["message"]
    assert out[11]["error"] == "StatusCode.NOT_FOUND"
    assert out[12] == [{"name": "add", "version": "1", "state": "READY"}]


# ---------------------------------------------------------------- hot swap


@pytest.fixture(params=["queued", "batched"])
def stream_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[NodeServer, Path]]:
    """A node serving ``add`` version 1, unbatched (its queue) or with dynamic batching."""
    repo = tmp_path / "repo"
    write_offset_model(repo / "add" / "1", 1.0)
    if request.param == "batched":
        (repo / "add" / "model.yaml").write_text(
            "dynamic_batching: {max_batch_size: 4, max_queue_delay_us: 2000}\n"
        )
    with running_node(repo, max_workers=8) as node:
        yield node, repo / "add"


def _load(node: NodeServer, name: str) -> grpc.RpcError | None:
    channel, stub = _stub(node)
    with channel:
        try:
            stub.RepositoryModelLoad(inference_pb2.RepositoryModelLoadRequest(model_name=name), timeout=60)
        except grpc.RpcError as exc:
            return exc
    return None


def test_a_swap_under_a_steady_stream_fails_no_request(stream_node: tuple[NodeServer, Path]) -> None:
    node, model = stream_node
    with Stream(node.address, "add") as stream:
        stream.wait_for(lambda: stream.count("1") >= 100)
        _add_version(model, 2)
        t0 = time.perf_counter()
        assert _load(node, "add") is None
        swap_s = time.perf_counter() - t0
        stream.wait_for(lambda: stream.count("2") >= 100)
        _add_version(model, 3)
        assert _load(node, "add") is None
        stream.wait_for(lambda: stream.count("3") >= 100)
    assert node.lifecycle.wait_retired(10)
    assert stream.errors == []
    _assert_consistent(stream, {"1": 1.0, "2": 2.0, "3": 3.0})
    index = _index(node)
    assert index[("add", "3")] == ("READY", "")
    assert index[("add", "1")][0] == index[("add", "2")][0] == "UNAVAILABLE"
    assert set(node.plane.versions["add"]) == {3}
    latencies = sorted(r[3] for r in stream.all())
    print(
        f"\nswap: load+warm+switch {swap_s * 1e3:.0f} ms; {len(latencies)} requests, "
        f"p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms, 0 failed"
    )


def test_a_corrupt_version_leaves_the_old_one_serving(stream_node: tuple[NodeServer, Path]) -> None:
    node, model = stream_node
    with Stream(node.address, "add") as stream:
        stream.wait_for(lambda: stream.count("1") >= 20)
        _add_version(model, 2, corrupt=True)
        error = _load(node, "add")
        served_before = stream.count("1")
        stream.wait_for(lambda: stream.count("1") >= served_before + 20)
    assert stream.errors == []
    assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "load 'add' failed, version(s) [1] keep serving: version 2:" in (error.details() or "")
    assert {v for v, *_ in stream.all()} == {"1"}
    state, reason = _index(node)[("add", "2")]
    assert state == "UNAVAILABLE" and "EngineError" in reason
    failed = node.metrics.model_loads.labels(model="add", version="2", result="failed")._value.get()
    assert failed == 1
    # Fixed files load on the next try.
    shutil.rmtree(model / "2")
    _add_version(model, 2)
    assert _load(node, "add") is None
    assert node.plane.models["add"].version == 2


def test_watch_swaps_in_a_new_version_skips_a_broken_one_and_unloads_a_removed_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = repo / "add"
    write_offset_model(model / "1", 1.0)
    with running_node(repo, watch=True, watch_interval_s=0.1) as node:
        with Stream(node.address, "add", 2) as stream:
            stream.wait_for(lambda: stream.count("1") >= 10)
            _add_version(model, 2, corrupt=True)
            stream.wait_for(lambda: _index(node).get(("add", "2"), ("",))[0] == "UNAVAILABLE", 30)
            (model / "3").mkdir()  # written in place, slowly: the watcher waits for it to hold still
            write_offset_model(model / "3", 3.0)
            stream.wait_for(lambda: stream.count("3") >= 10, 30)
        assert stream.errors == []
        _assert_consistent(stream, {"1": 1.0, "3": 3.0})
        shutil.rmtree(model)  # a folder removed from the repository is unloaded
        deadline = time.monotonic() + 30
        while "add" in node.plane.models:
            assert time.monotonic() < deadline, "the removed model was not unloaded"
            time.sleep(0.05)
        assert _index(node) == {}


# ---------------------------------------------------------------- the coordinator notices


async def test_the_registry_starts_a_fresh_profile_for_a_new_version(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_offset_model(repo / "add" / "1", 1.0, model_yaml=None)
    (repo / "add" / "model.yaml").write_text("task: test\n")
    with running_node(repo) as node:
        config = parse_fleet({"nodes": [{"address": node.address, "name": "n0"}]}, env={})
        async with Registry(config) as registry:
            (replica,) = registry.replicas("test")
            assert replica.version == "1"
            client = registry.client(replica)
            for _ in range(3):
                result = await client.infer("add", {"x": np.zeros((1, 4), np.float32)}, timeout=10)
                registry.observe(replica, result, 5.0)
            assert replica.profile.replies == 3
            await registry._describe(registry.nodes[0])
            assert registry.replicas("test")[0].profile.replies == 3  # same version: profile kept
            _add_version(repo / "add", 2)
            assert _load(node, "add") is None
            epoch = registry.epoch
            await registry._describe(registry.nodes[0])
            (fresh,) = registry.replicas("test")
            assert fresh.version == "2" and fresh.profile.replies == 0 and registry.epoch > epoch
