"""``moesaic import-model``: bring your own weights into a model repository as a new version.

    moesaic import-model best.onnx --repo models --name my-yolo
    moesaic import-model best.pt --repo models --name my-yolo --imgsz 640   # ultralytics, offline

An ultralytics checkpoint (``.pt``) is exported to ONNX here, offline (no download, no pip:
:func:`~moesaic.models.detector.offline.import_ultralytics`), with its class names. An ONNX
file that ultralytics exported carries its task, class names and input size in its metadata;
it is then served through the ``yolo`` processor (images in, boxes out), ready for the
coordinator's detection task. Any other ONNX file is served as its raw tensors (name the
task and class names with ``--task`` and ``--class-names``).

The result is a version folder ``<repo>/<name>/<version>/`` (the next free number; ``1`` for
a new model) holding ``model.onnx`` and ``profile.json`` (its latency and energy measured on
this device through the node's own request path, which a node advertises in Describe until
it has its own figures), beside a ``model.yaml`` scaffold for a new model (an existing
model's ``model.yaml`` is left alone; what differs for the new version goes in the version
folder's own ``model.yaml``). Everything is written in a hidden staging folder first and put
in place with one rename, so a node watching the repository (``--watch``) never sees half a
version; it loads it and swaps it in.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moesaic.nodes.repository import MODEL_FILE, ONNX_FILE, load_model_spec, read_model_entry
from moesaic.runtime.engine import MissingExtraError
from moesaic.runtime.profiler import ProfileRecord

__all__ = ["Imported", "OnnxFacts", "import_model", "read_onnx_facts", "register"]

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
_ULTRALYTICS_TASKS = {"detect": "detection"}


@dataclass
class OnnxFacts:
    """What an ONNX file says about itself."""

    ultralytics: bool = False
    task: str = ""
    class_names: list[str] = field(default_factory=list)
    imgsz: int | None = None
    inputs: list[str] = field(default_factory=list)


@dataclass
class Imported:
    """Where an import went and what it measured."""

    name: str
    version: int
    folder: Path
    spec: dict[str, Any]
    profile: list[ProfileRecord]
    new_model: bool


def read_onnx_facts(path: Path) -> OnnxFacts:
    """Task, class names and input size from an ONNX file's metadata (ultralytics writes them);
    ``ValueError`` naming the file when it is not a model ONNX Runtime can load. Read with ONNX
    Runtime (the node's own runtime), so importing needs no ``onnx`` package."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingExtraError("onnxruntime", "cpu") from None

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the error below says what was wrong, once
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises InvalidProtobuf, Fail, NoSuchFile ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a valid ONNX model ({first})") from None
    meta = {str(k): str(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    facts = OnnxFacts(inputs=[i.name for i in session.get_inputs()])
    if meta.get("author", "").lower() == "ultralytics" and "names" in meta:
        facts.ultralytics = True
        facts.task = _ULTRALYTICS_TASKS.get(meta.get("task", ""), meta.get("task", ""))
        names = _literal(meta["names"])
        if isinstance(names, dict):
            facts.class_names = [str(names[k]) for k in sorted(names)]
        size = _literal(meta.get("imgsz", ""))
        if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
            facts.imgsz = int(size[0])
    return facts


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def export_ultralytics(checkpoint: Path, out_dir: Path, *, imgsz: int | None) -> Path:
    """Export an ultralytics ``.pt`` to ONNX in ``out_dir`` (offline); the ONNX path."""
    from moesaic.models.detector.offline import import_ultralytics

    ultralytics = import_ultralytics()
    local = out_dir / checkpoint.name
    shutil.copyfile(checkpoint, local)  # ultralytics writes the export beside the checkpoint
    try:
        yolo = ultralytics.YOLO(str(local))
    except Exception as exc:
        raise ValueError(f"{checkpoint}: not an ultralytics checkpoint ({exc})") from None
    if yolo.task != "detect":
        raise ValueError(f"{checkpoint}: an ultralytics {yolo.task!r} model; import-model takes detectors")
    size = imgsz or int(getattr(yolo.model, "args", {}).get("imgsz", 640) or 640)
    exported = yolo.export(format="onnx", imgsz=size, simplify=True, dynamic=False, opset=17)
    return Path(exported)


def import_model(
    source: Path,
    repo: Path,
    *,
    name: str | None = None,
    task: str | None = None,
    class_names: list[str] | None = None,
    imgsz: int | None = None,
    description: str = "",
    synthetic: bool = False,
    version: int | None = None,
    device: str = "cpu",
    profile_runs: int = 20,
) -> Imported:
    """Import ``source`` (``.onnx`` or ultralytics ``.pt``) into ``repo`` as a new version.

    ``ValueError`` (one line, naming the file) for a bad source, name, version or a model that
    does not load; nothing is left in ``repo`` then.
    """
    source = Path(source)
    repo = Path(repo)
    if not source.is_file():
        raise ValueError(f"{source}: no such file")
    if source.suffix not in (".onnx", ".pt"):
        raise ValueError(f"{source}: expected an .onnx file or an ultralytics .pt checkpoint")
    if not repo.is_dir():
        raise ValueError(f"--repo {repo}: not a directory (create it, or name the node's model repository)")
    name = name or _name_from(source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    with tempfile.TemporaryDirectory(prefix="moesaic-import-") as scratch:
        onnx_path = source
        if source.suffix == ".pt":
            onnx_path = export_ultralytics(source, Path(scratch), imgsz=imgsz)
        facts = read_onnx_facts(onnx_path)
        spec = _spec(name, facts, task, class_names, imgsz, description, synthetic, source)
        folder = repo / name
        existing = read_model_entry(folder) if folder.is_dir() else None
        if folder.is_dir() and existing is None and any(folder.iterdir()):
            raise ValueError(f"{folder}: exists and is not a model folder; choose another --name")
        if existing is not None and existing.name != name:
            raise ValueError(f"{folder / MODEL_FILE}: names the model {existing.name!r}, not {name!r}")
        taken = sorted(existing.versions) if existing is not None else []
        number = version or (max(taken) + 1 if taken else 1)
        if number < 1 or number in taken:
            raise ValueError(f"--version {number}: {name} already has versions {taken}")
        new_model = existing is None
        stage_root = repo if new_model else folder
        staging = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=stage_root))
        try:
            model_dir = staging if new_model else folder
            version_dir = staging / str(number) if new_model else staging
            version_dir.mkdir(exist_ok=True)
            shutil.copyfile(onnx_path, version_dir / ONNX_FILE)
            if new_model:
                (staging / MODEL_FILE).write_text(_scaffold(spec))
            else:
                differs = _version_overrides(folder, spec)
                if differs:
                    (version_dir / MODEL_FILE).write_text(yaml.safe_dump(differs, sort_keys=False))
            records = _profile(model_dir, version_dir, number, device, profile_runs)
            if records:
                from moesaic.runtime.profiler import write_profile_file

                write_profile_file(version_dir / PROFILE_FILE, records)
            os.replace(staging, folder if new_model else folder / str(number))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return Imported(name, number, folder / str(number), spec, records, new_model)


def _name_from(source: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem).strip("-.") or "model"
    return stem if stem not in ("best", "last", "model") else f"my-{stem}"


def _spec(
    name: str,
    facts: OnnxFacts,
    task: str | None,
    class_names: list[str] | None,
    imgsz: int | None,
    description: str,
    synthetic: bool,
    source: Path,
) -> dict[str, Any]:
    names = list(class_names) if class_names else facts.class_names
    spec: dict[str, Any] = {
        "name": name,
        "task": task if task is not None else facts.task,
        "description": description or f"imported from {source.name}",
        "synthetic": synthetic,
        "engine": {"type": "onnxruntime"},
    }
    if facts.ultralytics and facts.task == "detection":
        size = imgsz or facts.imgsz or 640
        spec["processor"] = {"type": "yolo", "imgsz": size, "conf": 0.25, "iou": 0.7, "class_names": names}
    elif names:
        spec["class_names"] = names
    return spec


def _scaffold(spec: dict[str, Any]) -> str:
    """model.yaml with a comment on what each key does and what else can be set."""
    body = yaml.safe_dump(spec, sort_keys=False)
    return (
        "# Written by `moesaic import-model`; edit freely (docs/node.md lists every key).\n"
        "# task: what the coordinator selects this model for (detection, bev_segmentation, ...).\n"
        "# synthetic: true when the weights saw generated data only (Describe and detect say so).\n"
        "# Versions live in numbered folders beside this file; `version_policy: {latest: 1}`\n"
        "# (the default) serves the highest. Other keys: max_batch_size, instances,\n"
        "# dynamic_batching, version_policy, input_format.\n" + body
    )


def _version_overrides(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``spec`` the model's shared model.yaml says otherwise (for the version's own)."""
    shared = yaml.safe_load((folder / MODEL_FILE).read_text()) if (folder / MODEL_FILE).is_file() else {}
    shared = shared if isinstance(shared, dict) else {}
    keys = ("task", "processor", "class_names", "description", "synthetic")
    return {
        k: spec[k]
        for k in keys
        if k in spec and shared.get(k) != spec[k] and not (k == "task" and not spec[k])
    }


def _profile(
    model_dir: Path, version_dir: Path, version: int, device_spec: str, runs: int
) -> list[ProfileRecord]:
    """Load the staged version the way a node does and time it on the node's path; an import
    whose model does not load fails here, before anything is in the repository."""
    from moesaic.metrics import Metrics
    from moesaic.nodes.dataplane import DataPlane
    from moesaic.nodes.profiling import profile_served
    from moesaic.nodes.served import ServedModel
    from moesaic.runtime.commands import synthetic_inputs
    from moesaic.runtime.cost import CostMeter
    from moesaic.runtime.devices import discover_device
    from moesaic.runtime.energy import open_meter

    spec, engine = load_model_spec(model_dir, version_folder=version_dir)
    model = ServedModel(version_dir, spec, engine, version=version, model_folder=model_dir)
    device = discover_device(device_spec)
    with CostMeter(open_meter(device), device=device.id) as cost:
        model.load(device, cost=cost)
        if not model.ready:
            raise ValueError(f"{version_dir.name}: the model does not load: {model.error}")
        try:
            if runs < 1:
                return []
            sample = model.processor.sample_inputs() if model.processor is not None else None
            inputs = sample or synthetic_inputs(model.inputs, 1)
            if inputs is None:
                log.warning("%s: no batch-1 input to profile with; no profile.json", spec.name)
                return []
            plane = DataPlane({model.name: model}, cost, Metrics(component="import"))
            return [profile_served(plane, model, inputs, runs=runs, warmup=2, idle_s=0.5)]
        finally:
            model.close()


# ---------------------------------------------------------------- the command


def register(subparsers: Any) -> None:
    """Add ``import-model`` to the ``moesaic`` command."""
    p = subparsers.add_parser(
        "import-model",
        help="bring your own weights (.onnx, or ultralytics .pt) into a model repository as a new version",
        description="Copy SOURCE into REPO/NAME/VERSION/ with a model.yaml scaffold and a profile of "
        "its latency and energy on this device. A node started with --watch (or told to "
        "load NAME through the KServe repository API) swaps it in without downtime.",
    )
    p.add_argument(
        "source", type=Path, help="an .onnx file, or an ultralytics .pt checkpoint (exported offline)"
    )
    p.add_argument("--repo", type=Path, default=Path("models"), help="model repository")
    p.add_argument("--name", help="model name (default: from the file name)")
    p.add_argument(
        "--task", help="task the coordinator selects it for (default: detection for ultralytics detectors)"
    )
    p.add_argument("--class-names", help="comma-separated class names (default: from the model's metadata)")
    p.add_argument("--imgsz", type=int, help="input size of an ultralytics model (default: its own)")
    p.add_argument("--description", default="", help="free text for model.yaml")
    p.add_argument("--synthetic", action="store_true", help="the weights were trained on generated data only")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--device", default="cpu", help="device to profile on: cpu, cuda:N, jetson, auto")
    p.add_argument("--runs", type=int, default=20, help="timed inferences of the profile; 0 skips it")
    p.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.class_names.split(",") if n.strip()] if args.class_names else None
    try:
        imported = import_model(
            args.source,
            args.repo,
            name=args.name,
            task=args.task,
            class_names=names,
            imgsz=args.imgsz,
            description=args.description,
            synthetic=args.synthetic,
            version=args.version,
            device=args.device,
            profile_runs=args.runs,
        )
    except (ValueError, LookupError) as exc:
        print(f"moesaic import-model: {exc}", file=sys.stderr)
        return 2
    spec = imported.spec
    names_out = (spec.get("processor") or {}).get("class_names") or spec.get("class_names") or []
    print(f"imported {args.source} as {imported.name} version {imported.version}: {imported.folder}")
    print(f"  task: {spec['task'] or '(none: served, never selected by the coordinator)'}")
    if names_out:
        print(f"  classes: {', '.join(names_out)}")
    for rec in imported.profile:
        print(
            f"  profile ({rec.device}, {rec.engine}): p50 {rec.latency_ms.p50:.1f} ms, "
            f"p95 {rec.latency_ms.p95:.1f} ms, {rec.energy_mj_per_inference:.1f} mJ/inference "
            f"({rec.energy_source})"
        )
    if imported.new_model:
        print(f"  model.yaml: {args.repo / imported.name / MODEL_FILE} (check what it guessed)")
    print(
        f"serve it: moesaic node --models {args.repo}   (a node already running with --watch loads it "
        "by itself; or tritonclient's load_model(...))"
    )
    return 0
