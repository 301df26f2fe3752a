"""A node's model lifecycle: load, reload with a zero-downtime swap, unload, watch the repository.

The node serves what :class:`ModelLifecycle` installs in its :class:`~moesaic.nodes.dataplane.
DataPlane`. Loading a model (at start, by ``RepositoryModelLoad``, or by the watcher when a
folder changed) reads its folder, picks the versions ``version_policy`` serves, and for each
version that is new or changed:

1. builds and loads it beside the version serving now (the engine warms up in ``load()``),
2. warms it through the whole request path (the node's probe, which also calibrates the
   service time ``Describe`` reports),
3. switches: one assignment makes it the version requests resolve to, so a request resolves
   either the old or the new version, never neither,
4. retires the old version: it takes no new requests, those holding it finish, then it closes.

If any step fails for any version, nothing is switched: the versions serving before keep
serving, the error goes back to the caller (FAILED_PRECONDITION, or INVALID_ARGUMENT for a
bad load config), to the log, to ``moesaic_model_loads{result="failed"}`` and to the
repository index (the version's ``reason``). A load that changes nothing is a no-op.

The watcher (``moesaic node --watch``) polls the repository every ``watch_interval_s``: a
folder whose files changed and then stayed unchanged for one more poll (a copy in progress
is not loaded half-written) is loaded again; a new folder is loaded; a removed folder is
unloaded. A failed state is not retried until its files change again.

>>> # lifecycle = ModelLifecycle(Path("models"), plane, load=..., metrics=..., set_health=...)
>>> # lifecycle.scan(); lifecycle.load_initial()
>>> # lifecycle.load("yolo-n")            # new version 2 swapped in, version 1 retired
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesaic.errors import FailedPrecondition, InvalidInput, NotFound, quote
from moesaic.metrics import Metrics
from moesaic.nodes.dataplane import DataPlane
from moesaic.nodes.repository import ModelEntry, read_model_entry, scan_repository
from moesaic.nodes.served import ServedModel
from moesaic.nodes.versions import fingerprint
from moesaic.runtime.engine import EngineError

__all__ = ["IndexEntry", "ModelLifecycle"]

log = logging.getLogger(__name__)

Signature = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index: a model version and its state."""

    name: str
    version: str
    state: str
    """``READY``, ``LOADING``, ``UNLOADING`` or ``UNAVAILABLE`` (Triton's words)."""
    reason: str = ""


_INDEX_STATE = {
    "ready": "READY",
    "loading": "LOADING",
    "unloading": "UNLOADING",
    "failed": "UNAVAILABLE",
    "hung": "UNAVAILABLE",
    "unloaded": "UNAVAILABLE",
}


class ModelLifecycle:
    """Loads, swaps and unloads the models of one repository into a :class:`DataPlane`.

    ``load``: loads one :class:`ServedModel` (device, cost meter, batch observer, CPU fallback
    rule: the node's); ``warm(model)``: runs it once through the request path;
    ``set_health(name, serving)``: the gRPC health status of a model name.
    """

    def __init__(
        self,
        root: Path,
        plane: DataPlane,
        *,
        load: Callable[[ServedModel], None],
        warm: Callable[[ServedModel], None],
        metrics: Metrics,
        set_health: Callable[[str, bool], None],
        drain_timeout_s: float = 60.0,
    ) -> None:
        self.root = Path(root)
        self.plane = plane
        self._load = load
        self._warm = warm
        self.metrics = metrics
        self._set_health = set_health
        self.drain_timeout_s = drain_timeout_s
        self.entries: dict[str, ModelEntry] = {}
        self._signatures: dict[int, Signature] = {}  # id(ServedModel) -> what it was loaded from
        self._failures: dict[tuple[str, int | None], str] = {}
        self._unloaded: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._switch = threading.Lock()
        self._retiring: set[threading.Thread] = set()
        self._polled: dict[Path, Signature] = {}  # folder -> fingerprint at the last poll
        self._acted: dict[Path, Signature] = {}  # folder -> fingerprint last loaded (or tried)
        self._sources: dict[Path, str] = {}  # folder -> model name it holds
        self._pending: list[ServedModel] = []

    # -------------------------------------------------------------- start

    def scan(self) -> list[ServedModel]:
        """Read the repository (``ValueError`` naming file and field when a model.yaml is wrong)
        and install every served version in ``loading`` state; returns them, to be loaded by
        :meth:`load_initial`."""
        self.entries = scan_repository(self.root)
        if not self.entries:
            log.warning(
                "model repository %s holds no model: expected <model>/model.onnx, <model>/model.yaml "
                "or <model>/<version>/model.onnx folders",
                self.root,
            )
        pending: list[ServedModel] = []
        for name, entry in self.entries.items():
            versions = entry.served_versions()
            if not versions:
                self._failures[(name, None)] = self._no_version(entry)
                log.warning("model %s: %s", name, self._failures[(name, None)])
                continue
            group = {v: entry.build(v) for v in versions}
            for model in group.values():
                self._signatures[id(model)] = _signature(entry, model)
            self.plane.versions[name] = group
            self.plane.models[name] = group[max(group)]
            self.plane.register(name)
            pending.extend(group.values())
            self._sources[entry.folder] = name
        for folder in self._folders():
            self._polled[folder] = self._acted[folder] = fingerprint(folder)
        self._pending = pending
        return pending

    def load_initial(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Load what :meth:`scan` installed, each version on its own thread (a TensorRT build
        takes minutes and must not hold the others back), then warm each ready one."""
        pending, self._pending = self._pending, []
        threads = [
            threading.Thread(
                target=self._load_checked, args=(m,), name=f"load-{m.name}-{m.version}", daemon=True
            )
            for m in pending
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if stopping():
            return
        for model in pending:
            if model.ready:
                self._warm_checked(model)
        with self._switch:
            for name, group in list(self.plane.versions.items()):
                self.plane.models[name] = _default(group)
        for model in pending:
            self._loaded(model)
            if model.ready:
                self._set_health(model.name, True)

    # -------------------------------------------------------------- load / unload

    def load(self, name: str, config: Mapping[str, Any] | None = None) -> None:
        """Load (or reload) model ``name`` from the repository; ``config`` overrides its
        model.yaml keys for this load. Raises :class:`NotFound` (no such model folder),
        :class:`InvalidInput` (bad ``config``) or :class:`FailedPrecondition` (a version did
        not load or warm up; what served before still serves)."""
        with self._lock_for(name):
            self._reload(name, config)

    def _reload(self, name: str, config: Mapping[str, Any] | None) -> None:
        folder = self._folder_of(name)
        try:
            entry = read_model_entry(folder, overrides=config)
        except ValueError as exc:
            self._fail(name, None, str(exc))
            if config:
                raise InvalidInput(f"load {name!r}: {exc}", reason="bad_config") from None
            raise FailedPrecondition(f"load {name!r}: {exc}", reason="bad_model_yaml") from None
        if entry is None:
            raise NotFound(f"model {quote(name)}: {folder} holds no model files", reason="unknown_model")
        if entry.name != name:
            raise FailedPrecondition(
                f"load {name!r}: {folder / 'model.yaml'} names the model {entry.name!r}", reason="renamed"
            )
        wanted = entry.served_versions()
        if not wanted:
            message = self._no_version(entry)
            self._fail(name, None, message)
            raise FailedPrecondition(f"load {name!r}: {message}", reason="no_version")
        self._failures.pop((name, None), None)
        current = dict(self.plane.versions.get(name, {}))
        fresh: dict[int, ServedModel] = {}
        errors: list[str] = []
        for version in wanted:
            old = current.get(version)
            try:
                candidate = entry.build(version)
            except ValueError as exc:
                errors.append(f"version {version}: {exc}")
                self._fail(name, version, str(exc))
                continue
            signature = _signature(entry, candidate)
            if old is not None and old.ready and self._signatures.get(id(old)) == signature:
                continue  # unchanged and serving
            self._signatures[id(candidate)] = signature
            self._load_checked(candidate)
            if candidate.ready:
                self._warm_checked(candidate)
            self._loaded(candidate)
            if candidate.ready:
                fresh[version] = candidate
            else:
                errors.append(f"version {version}: {candidate.error}")
        self.entries[name] = entry  # the index shows what is on disk, loaded or not
        if errors:
            for model in fresh.values():
                model.close()
                model.state = "unloaded"
            if not any(m.ready for m in current.values()):
                self._install_failed(entry, wanted, errors)
            raise FailedPrecondition(
                f"load {name!r} failed, {self._kept(current)}: {'; '.join(errors)}", reason="load_failed"
            )
        self._sources[entry.folder] = name
        self._unloaded.discard(name)
        self.plane.unloaded.discard(name)
        group = {v: fresh.get(v) or current[v] for v in wanted}
        retired = [m for v, m in current.items() if group.get(v) is not m]
        if not fresh and not retired:
            return  # nothing changed
        with self._switch:
            self.plane.register(name)
            self.plane.versions[name] = group
            self.plane.models[name] = _default(group)
        self._set_health(name, True)
        for model in fresh.values():
            log.info(
                "model %s version %d serving%s",
                name,
                model.version,
                f" (replaces version(s) {sorted(m.version for m in retired)})" if retired else "",
            )
        self._retire(retired)

    def unload(self, name: str) -> None:
        """Stop serving ``name``: it leaves the node at once, requests holding it finish, then
        every version closes. :class:`NotFound` when it is not served."""
        with self._lock_for(name):
            if name not in self.plane.models:
                raise NotFound(
                    f"model {quote(name)} is not loaded; loaded: {sorted(self.plane.models)}",
                    reason="unknown_model",
                )
            with self._switch:
                group = self.plane.versions.pop(name, {})
                self.plane.models.pop(name, None)
            self._set_health(name, False)
            self._unloaded.add(name)
            self.plane.unloaded.add(name)
            log.info("model %s unloading (versions %s)", name, sorted(group))
            self._retire(list(group.values()))

    def wait_retired(self, timeout: float | None = None) -> bool:
        """Wait for retired versions to finish closing (tests, shutdown); True when all did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._retiring):
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in self._retiring)

    # -------------------------------------------------------------- index

    def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """Every model and version of the repository with its state, sorted by name and version."""
        rows: dict[tuple[str, int], IndexEntry] = {}
        for name, entry in list(self.entries.items()):
            served = self.plane.versions.get(name, {})
            wanted = set(entry.served_versions())
            for version in entry.versions:
                reason = self._failures.get((name, version), "")
                if version in served:
                    continue
                if name in self._unloaded:
                    reason = reason or "unloaded"
                elif version not in wanted:
                    reason = reason or f"not in the version policy ({entry.spec.version_policy.describe()})"
                rows[(name, version)] = IndexEntry(name, str(version), "UNAVAILABLE", reason)
        for model in self.plane.served():
            state = _INDEX_STATE.get(model.state, "UNAVAILABLE")
            rows[(model.name, model.version)] = IndexEntry(model.name, model.version_str, state, model.error)
        out = sorted(rows.values(), key=lambda r: (r.name, int(r.version)))
        for (failed, which), reason in list(self._failures.items()):
            if which is None and not any(r.name == failed for r in out):
                out.append(IndexEntry(failed, "", "UNAVAILABLE", reason))
        if ready_only:
            out = [r for r in out if r.state == "READY"]
        return out

    # -------------------------------------------------------------- watch

    def poll(self) -> None:
        """One pass of the watcher: load what changed (and then held still), unload what went."""
        current = {folder: fingerprint(folder) for folder in self._folders()}
        for folder, print_ in current.items():
            if self._polled.get(folder) != print_ or self._acted.get(folder) == print_:
                continue  # still changing, or already handled in this state
            self._acted[folder] = print_
            try:
                entry = read_model_entry(folder)
            except ValueError as exc:
                name = self._sources.get(folder, folder.name)
                self._fail(name, None, str(exc))
                log.error("watch: %s", exc)
                continue
            if entry is None:
                continue
            try:
                self.load(entry.name)
            except (FailedPrecondition, InvalidInput, NotFound) as exc:
                log.error("watch: %s", exc.message)
        for folder in list(self._acted):
            if folder in current:
                continue
            del self._acted[folder]
            gone = self._sources.pop(folder, None)
            if gone is not None and gone in self.plane.models:
                log.info("watch: %s was removed; unloading model %s", folder, gone)
                self.unload(gone)
                self.entries.pop(gone, None)
        self._polled = current

    def watch(self, interval_s: float, stop: threading.Event) -> None:
        """Poll every ``interval_s`` until ``stop`` is set (the node's watcher thread)."""
        while not stop.wait(interval_s):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any one bad folder
                log.exception("watch: polling %s failed", self.root)

    # -------------------------------------------------------------- internals

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _folder_of(self, name: str) -> Path:
        entry = self.entries.get(name)
        if entry is not None and entry.folder.is_dir():
            return entry.folder
        for folder in self._folders():
            try:
                found = read_model_entry(folder)
            except ValueError:
                if folder.name == name:
                    return folder  # its error is what the caller should see
                continue
            if found is not None and found.name == name:
                return folder
        raise NotFound(
            f"model {quote(name)}: no such model in the repository {self.root}", reason="unknown_model"
        )

    def _lock_for(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def _load_checked(self, model: ServedModel) -> None:
        try:
            self._load(model)
        except Exception as exc:  # the loader reports into the model; anything else is its error
            model.state, model.error = "failed", f"{type(exc).__name__}: {exc}"

    def _warm_checked(self, model: ServedModel) -> None:
        """Warm ``model`` through the request path; an engine failure there fails the model (a
        probe input the model refuses does not)."""
        try:
            self._warm(model)
        except EngineError as exc:
            model.close()
            model.state, model.error = "failed", f"warm-up failed: {exc}"
            log.error("model %s version %d %s", model.name, model.version, model.error)
        except Exception as exc:
            log.debug("warm-up of %s: %s", model.name, exc)

    def _loaded(self, model: ServedModel) -> None:
        """Metrics and the index of one finished load."""
        result = "ok" if model.ready else "failed"
        self.metrics.model_loads.labels(model=model.name, version=model.version_str, result=result).inc()
        if model.ready:
            self._failures.pop((model.name, model.version), None)
            self.metrics.model_info.labels(
                model=model.name,
                version=model.version_str,
                engine=model.engine_type,
                device=model.device,
                provider=model.provider,
            ).set(1)
        else:
            self._failures[(model.name, model.version)] = model.error

    def _fail(self, name: str, version: int | None, message: str) -> None:
        self._failures[(name, version)] = message
        self.metrics.model_loads.labels(
            model=name, version="" if version is None else str(version), result="failed"
        ).inc()
        log.error(
            "model %s%s failed to load: %s", name, "" if version is None else f" version {version}", message
        )

    def _install_failed(self, entry: ModelEntry, wanted: list[int], errors: list[str]) -> None:
        """Nothing of ``entry`` serves: show it as failed (Describe, ModelReady, requests)."""
        placeholder = entry.build(wanted[-1]) if wanted else None
        if placeholder is None:
            return
        placeholder.state, placeholder.error = "failed", "; ".join(errors)
        with self._switch:
            self.plane.register(entry.name)
            self.plane.versions[entry.name] = {}
            self.plane.models[entry.name] = placeholder
        self.entries[entry.name] = entry

    def _retire(self, models: list[ServedModel]) -> None:
        """Retire ``models`` on a thread: requests holding them finish, then they close."""
        if not models:
            return

        def run() -> None:
            for model in models:
                finished = model.retire(self.drain_timeout_s)
                with contextlib.suppress(KeyError):
                    self.metrics.model_info.remove(
                        model.name, model.version_str, model.engine_type, model.device, model.provider
                    )
                log.info(
                    "model %s version %d unloaded%s",
                    model.name,
                    model.version,
                    "" if finished else f" (requests still running after {self.drain_timeout_s:g} s)",
                )
            self._retiring.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"retire-{models[0].name}", daemon=True)
        self._retiring.add(thread)
        thread.start()

    def _kept(self, current: Mapping[int, ServedModel]) -> str:
        ready = sorted(v for v, m in current.items() if m.ready)
        return f"version(s) {ready} keep serving" if ready else "nothing of it serves"

    @staticmethod
    def _no_version(entry: ModelEntry) -> str:
        return (
            f"no version to serve: version_policy {entry.spec.version_policy.describe()} matches none "
            f"of the versions present {sorted(entry.versions)}"
        )


def _default(group: Mapping[int, ServedModel]) -> ServedModel:
    """The version serving requests that name none: the highest ready one, else the highest."""
    ready = [v for v, m in group.items() if m.ready]
    return group[max(ready or group)]


def _signature(entry: ModelEntry, model: ServedModel) -> Signature:
    """What a loaded version was built from: its files and its spec (the policy aside)."""
    files = fingerprint(model.folder, depth=0 if model.folder == entry.folder else 1)
    spec = model.spec.model_dump(exclude={"version_policy"})
    return (files, repr(sorted(spec.items())))
