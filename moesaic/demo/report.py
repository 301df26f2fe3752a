"""What the demo shows: the live table, the summary table and the HTML report.

Every figure comes from the summary (:func:`moesaic.demo.summary.summarise`), so the
terminal, ``summary.json`` and ``index.html`` agree. :class:`Samples` keeps a few frames
with their results for the report: BEV images and detection overlays.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = ["Sample", "Samples", "live_table", "summary_table", "write_report"]

_MAX_IMAGES = 6


@dataclass
class Sample:
    """A frame kept for the report: its bytes (camera) and the results it got."""

    sensor: str
    kind: str
    frame_id: int
    image: bytes | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    pngs: dict[str, bytes] = field(default_factory=dict)


class Samples:
    """Up to six frames per sensor, ``every`` frames apart, with their results and PNGs."""

    def __init__(self, every: Mapping[str, int]) -> None:
        self.every = dict(every)
        """Per sensor kind: frames between two kept frames."""
        self.kept: dict[tuple[str, int], Sample] = {}
        self._kinds: dict[str, str] = {}
        self._images: dict[tuple[str, int], bytes] = {}
        self._last: dict[tuple[str, str], int] = {}

    def published(self, sensor: str, kind: str, frame_id: int, image: bytes | None) -> None:
        """A frame sent; camera frames keep their bytes a while for detection overlays."""
        self._kinds[sensor] = kind
        if image is not None:
            self._images[(sensor, frame_id)] = image
            while len(self._images) > 64:
                del self._images[next(iter(self._images))]

    def result(self, body: Mapping[str, Any]) -> None:
        sensor, task, frame_id = str(body.get("sensor")), str(body.get("task")), int(body.get("frame_id", -1))
        self._last[(sensor, task)] = frame_id
        sample = self._sample_for(sensor, frame_id)
        if sample is not None:
            sample.results[task] = dict(body)

    def png(self, sensor: str, task: str, payload: bytes) -> None:
        """The PNG of a grid result; it follows its JSON on the same topic level."""
        sample = self.kept.get((sensor, self._last.get((sensor, task), -1)))
        if sample is not None:
            sample.pngs[task] = payload

    def _sample_for(self, sensor: str, frame_id: int) -> Sample | None:
        key = (sensor, frame_id)
        if key in self.kept:
            return self.kept[key]
        kind = self._kinds.get(sensor, "")
        kept = [s for (name, _), s in self.kept.items() if name == sensor]
        if len(kept) >= _MAX_IMAGES or (
            kept and frame_id - max(s.frame_id for s in kept) < self.every.get(kind, 20)
        ):
            return None
        sample = self.kept[key] = Sample(sensor, kind, frame_id, self._images.get(key))
        return sample


def _fmt(value: Any, spec: str = ".0f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _ratio(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f}%)" if whole else str(part)


def _experts_cell(body: Mapping[str, Any]) -> str:
    experts = body.get("experts", [])
    return ", ".join(f"{e['id']} ({e['weight']:.2f})" for e in experts if e.get("status") == "ok") or "-"


def _budget_cell(body: Mapping[str, Any]) -> str:
    budget = body.get("budget", {})
    parts = []
    if budget.get("latency_ms"):
        parts.append(f"{budget['latency_ms']:.0f} ms")
    if budget.get("energy_mj"):
        parts.append(f"{budget['energy_mj']:.0f} mJ")
    return " / ".join(parts) or "none"


def live_table(summary: Mapping[str, Any], last: Mapping[str, Mapping[str, Any]], *, frames: int) -> Table:
    """The table refreshed while frames are replayed: per task the last result and the tallies."""
    table = Table(title=f"moesaic demo: {summary['duration_s']:4.0f} s, {frames} frames sent")
    for column in ("task", "results", "errors", "dropped", "last experts (weight)", "latency ms", "budget"):
        table.add_column(column, justify="left" if column in ("task", "last experts (weight)") else "right")
    for task, t in summary["tasks"].items():
        body = last.get(task, {})
        latency = f"{body.get('latency_ms', 0):.0f} (p50 {_fmt(t['latency_ms']['p50'])})" if body else "-"
        table.add_row(
            task,
            str(t["results"]),
            str(t["errors"]),
            str(t["dropped"]),
            _experts_cell(body),
            latency,
            _budget_cell(body),
        )
    return table


def summary_table(summary: Mapping[str, Any]) -> Table:
    """The end-of-run summary: the figures of ``summary.json``, one row per task."""
    tasks = summary["tasks"].values()
    frames = sum(t["frames"] for t in tasks)
    table = Table(
        title=(
            f"summary: {summary['duration_s']:.0f} s, {frames} task frames, "
            f"{sum(t['results'] for t in tasks)} results, {sum(t['errors'] for t in tasks)} errors, "
            f"{sum(t['dropped'] for t in tasks)} dropped"
        ),
        caption="feasible: the budget admitted an expert set by the coordinator's prediction; "
        "within budget: measured latency and energy met it",
    )
    columns = ["task", "frames", "results", "errors", "dropped", "feasible", "within budget"]
    columns += ["of feasible", "latency ms mean/p50/p99", "energy mJ", "gate", "selections"]
    for column in columns:
        left = column in ("task", "gate", "selections")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "task")
    for task, t in summary["tasks"].items():
        latency = t["latency_ms"]
        energy = t["energy_mj"]
        table.add_row(
            task,
            str(t["frames"]),
            str(t["results"]),
            str(t["errors"]),
            _ratio(t["dropped"], t["frames"]),
            _ratio(t["feasible"], t["results"]),
            _ratio(t["within_budget"], t["results"]),
            _fmt(t["within_budget_of_feasible"], ".0%"),
            f"{_fmt(latency['mean'])}/{_fmt(latency['p50'])}/{_fmt(latency['p99'])}",
            f"{_fmt(energy['mean'], '.1f')} ({energy['source'] or '-'})",
            t["gate"],
            ", ".join(f"{k} x{v}" for k, v in t["selections"].items()),
        )
    return table


def _palette_legend(class_names: tuple[str, ...]) -> str:
    from moesaic.ingest.results import _PALETTE

    items = []
    for i, name in enumerate(class_names):
        r, g, b = (int(v) for v in _PALETTE[i % len(_PALETTE)])
        items.append(f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>{html.escape(name)}')
    return " ".join(items)


def _overlay(image: bytes, body: Mapping[str, Any], font_path: Path | None) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.open(io.BytesIO(image)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    size = max(12, canvas.width // 60)
    font: Any = ImageFont.truetype(str(font_path), size) if font_path and font_path.exists() else None
    for item in body.get("output", {}).get("items", []):
        x1, y1, x2, y2 = item["xyxy"]
        draw.rectangle([x1, y1, x2, y2], outline=(255, 64, 64), width=max(2, canvas.width // 400))
        label = f"{item.get('class_name') or item['class_id']} {item['score']:.2f}"
        draw.text((x1 + 2, max(0, y1 - size - 2)), label, fill=(255, 255, 0), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _scaled_png(png: bytes, scale: int = 2) -> bytes:
    from PIL import Image

    source = Image.open(io.BytesIO(png))
    image = source.resize((source.width * scale, source.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _figures(samples: Samples, images: Path, font_path: Path | None) -> list[str]:
    figures = []
    for (sensor, frame_id), sample in sorted(samples.kept.items(), key=lambda kv: (kv[1].kind, kv[0])):
        caption = f"{html.escape(sensor)} frame {frame_id}"
        for task, png in sorted(sample.pngs.items()):
            name = f"{sensor}-{frame_id}-{task}.png"
            (images / name).write_bytes(_scaled_png(png))
            body = sample.results.get(task, {})
            experts = ", ".join(e["id"] for e in body.get("experts", []) if e.get("status") == "ok")
            figures.append(
                f'<figure><img src="images/{name}"><figcaption>{caption}: {html.escape(task)} by '
                f"{html.escape(experts)}, {body.get('latency_ms', 0):.0f} ms</figcaption></figure>"
            )
        if sample.image is not None and "detection" in sample.results:
            name = f"{sensor}-{frame_id}-detection.jpg"
            body = sample.results["detection"]
            (images / name).write_bytes(_overlay(sample.image, body, font_path))
            count = len(body.get("output", {}).get("items", []))
            figures.append(
                f'<figure><img src="images/{name}" class="photo"><figcaption>{caption}: '
                f"{count} detections, {body.get('latency_ms', 0):.0f} ms</figcaption></figure>"
            )
    return figures


_STYLE = """body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
figure { display: inline-block; margin: 8px; vertical-align: top; }
figure img { image-rendering: pixelated; max-width: 420px; border: 1px solid #ccc; }
figure img.photo { image-rendering: auto; max-width: 640px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; border: 1px solid #999; }"""


def _rows(cells: list[list[Any]]) -> str:
    return "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells
    )


def write_report(
    out: Path,
    summary: Mapping[str, Any],
    samples: Samples,
    *,
    fleet: list[dict[str, Any]],
    class_names: tuple[str, ...] = (),
    font_path: Path | None = None,
    notes: list[str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``out/index.html`` (+ images); returns its path."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.iterdir():
        old.unlink()
    header = ["task", "frames", "results", "errors", "dropped", "feasible", "within budget", "of feasible"]
    header += ["mean latency ms", "p99 latency ms", "mean energy mJ", "gate", "experts chosen"]
    tasks = [
        [
            task,
            t["frames"],
            t["results"],
            t["errors"],
            t["dropped"],
            t["feasible"],
            t["within_budget"],
            _fmt(t["within_budget_of_feasible"], ".0%"),
            _fmt(t["latency_ms"]["mean"], ".1f"),
            _fmt(t["latency_ms"]["p99"], ".1f"),
            f"{_fmt(t['energy_mj']['mean'], '.1f')} ({t['energy_mj']['source'] or '-'})",
            t["gate"],
            ", ".join(f"{k} x{v}" for k, v in t["selections"].items()),
        ]
        for task, t in summary["tasks"].items()
    ]
    nodes = [[n["name"], n["threads"], ", ".join(n["experts"])] for n in fleet]
    figures = _figures(samples, images, font_path)
    examples = "".join(f"<li>{html.escape(json.dumps(e))}</li>" for e in errors or [])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>moesaic demo report</title>
<style>
{_STYLE}
</style></head><body>
<h1>moesaic demo</h1>
<p>{summary["duration_s"]:.0f} s of frames replayed through MQTT; the same figures are in
<a href="summary.json">summary.json</a>.</p>
{"".join(f"<p>{html.escape(n)}</p>" for n in notes or [])}
<h2>Per task</h2>
<table><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr>{_rows(tasks)}</table>
<h2>Fleet</h2>
<table><tr><th>node</th><th>threads</th><th>experts</th></tr>{_rows(nodes)}</table>
<h2>Outputs</h2>
<p>BEV classes: {_palette_legend(class_names) if class_names else "class ids"}</p>
{"".join(figures) or "<p>no images were kept</p>"}
{f"<h2>Errors (first 5)</h2><ul>{examples}</ul>" if examples else ""}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index
