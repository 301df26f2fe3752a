"""The Prometheus endpoints of the demo's components, read with prometheus_client's parser.

>>> text = 'moesaic_mqtt_frames_dropped_total{sensor="s0",reason="queue_full"} 3.0\\n'
>>> samples(text, "moesaic_mqtt_frames_dropped_total")
{(('reason', 'queue_full'), ('sensor', 's0')): 3.0}
"""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Labels", "fetch", "labelled", "samples", "save"]

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
"""A sample's labels, sorted by name."""


def fetch(port: int, *, host: str = "127.0.0.1", timeout: float = 2.0) -> str:
    """The ``/metrics`` text of a local endpoint; empty when it cannot be reached."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
            return str(response.read().decode())
    except OSError as exc:
        log.warning("metrics at %s:%d unreachable: %s", host, port, exc)
        return ""


def samples(text: str, name: str) -> dict[Labels, float]:
    """``{labels: value}`` of every sample called ``name`` (e.g. ``..._total``) in ``text``."""
    out: dict[Labels, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = tuple(sorted(sample.labels.items()))
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def labelled(values: dict[Labels, float], label: str) -> dict[str, float]:
    """``values`` summed by one label: ``{"queue_full": 3.0}`` for ``label="reason"``."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = dict(key).get(label, "")
        out[name] = out.get(name, 0.0) + value
    return out


def save(texts: dict[str, str], folder: Path) -> None:
    """Write each component's metrics text to ``folder/NAME.txt`` (for the report)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        if text:
            (folder / f"{name}.txt").write_text(text)
