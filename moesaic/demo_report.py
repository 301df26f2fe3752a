"""What the demo saw: per-task statistics, the rich tables, and the HTML report.

:class:`DemoStats` folds in every frame published and every result and error received;
:func:`live_table` and :func:`summary_table` render it for the terminal and
:func:`write_report` writes ``index.html`` with BEV segmentation images and detection overlays.
"""

from __future__ import annotations

import html
import io
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = ["DemoStats", "TaskStats", "live_table", "summary_table", "write_report"]

_MAX_IMAGES = 6


@dataclass
class TaskStats:
    """Results of one task."""

    results: int = 0
    budget_met: int = 0
    latency_ms: float = 0.0
    energy_mj: float = 0.0
    end_to_end_ms: float = 0.0
    measured_energy: int = 0
    experts: Counter[str] = field(default_factory=Counter)
    last: dict[str, Any] = field(default_factory=dict)

    def add(self, body: dict[str, Any], end_to_end_ms: float | None) -> None:
        self.results += 1
        self.budget_met += bool(body.get("budget_met"))
        self.latency_ms += float(body.get("latency_ms", 0.0))
        self.energy_mj += float(body.get("energy_mj", 0.0))
        self.measured_energy += body.get("energy_source") == "measured"
        if end_to_end_ms is not None:
            self.end_to_end_ms += end_to_end_ms
        for expert in body.get("experts", []):
            if expert.get("status") == "ok":
                self.experts[expert["id"]] += 1
        self.last = body

    def mean(self, total: float) -> float:
        return total / self.results if self.results else 0.0


@dataclass
class Sample:
    """A frame kept for the report: its bytes (camera) and the results it got."""

    kind: str
    frame_id: int
    image: bytes | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    pngs: dict[str, bytes] = field(default_factory=dict)


class DemoStats:
    """Frames published, results and errors received, per task and sensor."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.sent: Counter[str] = Counter()  # per kind
        self.sent_at: dict[tuple[str, int], float] = {}
        self.tasks: dict[str, TaskStats] = defaultdict(TaskStats)
        self.errors: Counter[str] = Counter()
        self.error_examples: list[dict[str, Any]] = []
        self.dropped: dict[str, float] = {}
        self.samples: dict[tuple[str, int], Sample] = {}
        self.sensor_kind: dict[str, str] = {}
        self._last_frame: dict[tuple[str, str], int] = {}
        self._images: dict[tuple[str, int], bytes] = {}
        self.sample_every: dict[str, int] = {}
        """Per sensor kind: frames between two frames kept for the report (default 20)."""

    def published(self, sensor: str, kind: str, frame_id: int, image: bytes | None = None) -> None:
        """Record a frame sent; camera frames keep their bytes a while for detection overlays."""
        self.sent[kind] += 1
        self.sensor_kind[sensor] = kind
        self.sent_at[(sensor, frame_id)] = time.monotonic()
        if image is not None:
            self._images[(sensor, frame_id)] = image
            while len(self._images) > 64:
                del self._images[next(iter(self._images))]

    def _sample_for(self, sensor: str, frame_id: int) -> Sample | None:
        """The kept sample of this frame; starts one when the last kept frame is far enough back."""
        key = (sensor, frame_id)
        if key in self.samples:
            return self.samples[key]
        kind = self.sensor_kind.get(sensor, "")
        kept = [s for (name, _), s in self.samples.items() if name == sensor]
        if len(kept) >= _MAX_IMAGES or (
            kept and frame_id - max(s.frame_id for s in kept) < self.sample_every.get(kind, 20)
        ):
            return None
        sample = self.samples[key] = Sample(kind, frame_id, self._images.get(key))
        return sample

    def result(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) == 6 and parts[-1] == "png":
            sample = self.samples.get((parts[3], self._last_frame.get((parts[3], parts[4]), -1)))
            if sample is not None:
                sample.pngs[parts[4]] = payload
            return
        body = json.loads(payload)
        sensor, task, frame_id = body["sensor"], body["task"], int(body.get("frame_id", 0))
        sent = self.sent_at.get((sensor, frame_id))
        self.tasks[task].add(body, (time.monotonic() - sent) * 1e3 if sent is not None else None)
        self._last_frame[(sensor, task)] = frame_id
        sample = self._sample_for(sensor, frame_id)
        if sample is not None:
            sample.results[task] = body

    def error(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            body = {"reason": "unparsable error message"}
        self.errors[str(body.get("reason"))] += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(body)

    @property
    def frames(self) -> int:
        return sum(self.sent.values())

    @property
    def total_dropped(self) -> int:
        return int(sum(self.dropped.values()))

    def budget_met_percent(self) -> float:
        results = sum(t.results for t in self.tasks.values())
        met = sum(t.budget_met for t in self.tasks.values())
        return 100.0 * met / results if results else 0.0


def _experts_cell(stats: TaskStats) -> str:
    experts = stats.last.get("experts", [])
    return ", ".join(f"{e['id']} ({e['weight']:.2f})" for e in experts if e.get("status") == "ok") or "-"


def _budget_cell(stats: TaskStats) -> str:
    budget = stats.last.get("budget", {})
    parts = []
    if budget.get("latency_ms"):
        parts.append(f"{budget['latency_ms']:.0f} ms")
    if budget.get("energy_mj"):
        parts.append(f"{budget['energy_mj']:.0f} mJ")
    return " / ".join(parts) or "none"


def live_table(stats: DemoStats, title: str = "moesaic demo") -> Table:
    """The table refreshed while frames are replayed."""
    elapsed = time.monotonic() - stats.started
    table = Table(
        title=f"{title}: {elapsed:4.0f} s, {stats.frames} frames sent, {stats.total_dropped} dropped"
    )
    for column in ("task", "results", "last experts (weight)", "latency ms", "budget", "energy mJ", "met"):
        table.add_column(column, justify="left" if column in ("task", "last experts (weight)") else "right")
    for task, s in sorted(stats.tasks.items()):
        latency = f"{s.last.get('latency_ms', 0):.0f} (avg {s.mean(s.latency_ms):.0f})"
        met = f"{100 * s.budget_met / s.results:.0f}%" if s.results else "-"
        table.add_row(
            task,
            str(s.results),
            _experts_cell(s),
            latency,
            _budget_cell(s),
            f"{s.mean(s.energy_mj):.1f}",
            met,
        )
    if stats.errors:
        table.caption = "errors: " + ", ".join(f"{k} x{v}" for k, v in stats.errors.items())
    return table


def summary_table(stats: DemoStats) -> Table:
    """The end-of-run summary: frames, budget met, per-task mean latency and energy, drops."""
    table = Table(
        title=(
            f"summary: {stats.frames} frames ({_sent(stats)}), "
            f"{stats.budget_met_percent():.0f}% within budget, {stats.total_dropped} dropped by the bridge, "
            f"{sum(stats.errors.values())} errors"
        )
    )
    for column in (
        "task",
        "results",
        "budget met",
        "mean latency ms",
        "mean end-to-end ms",
        "mean energy mJ",
        "experts",
    ):
        table.add_column(column, justify="left" if column in ("task", "experts") else "right")
    for task, s in sorted(stats.tasks.items()):
        source = "measured" if s.measured_energy == s.results and s.results else "estimated"
        table.add_row(
            task,
            str(s.results),
            f"{100 * s.budget_met / s.results:.0f}%" if s.results else "-",
            f"{s.mean(s.latency_ms):.1f}",
            f"{s.mean(s.end_to_end_ms):.1f}",
            f"{s.mean(s.energy_mj):.1f} ({source})",
            ", ".join(f"{k} x{v}" for k, v in s.experts.most_common()),
        )
    return table


def _sent(stats: DemoStats) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(stats.sent.items()))


def _palette_legend(class_names: tuple[str, ...]) -> str:
    from moesaic.ingest.results import _PALETTE

    items = []
    for i, name in enumerate(class_names):
        r, g, b = (int(v) for v in _PALETTE[i % len(_PALETTE)])
        items.append(f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>{html.escape(name)}')
    return " ".join(items)


def _overlay(image: bytes, body: dict[str, Any], font_path: Path | None) -> bytes:
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


def write_report(
    out: Path,
    stats: DemoStats,
    *,
    fleet: list[dict[str, Any]],
    class_names: tuple[str, ...] = (),
    font_path: Path | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write ``out/index.html`` (+ images); returns its path."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.iterdir():
        old.unlink()
    rows = []
    for task, s in sorted(stats.tasks.items()):
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    task,
                    s.results,
                    f"{100 * s.budget_met / s.results:.0f}%" if s.results else "-",
                    f"{s.mean(s.latency_ms):.1f}",
                    f"{s.mean(s.end_to_end_ms):.1f}",
                    f"{s.mean(s.energy_mj):.1f}",
                    ", ".join(f"{k} x{v}" for k, v in s.experts.most_common()),
                )
            )
            + "</tr>"
        )
    figures = []
    for (sensor, frame_id), sample in sorted(stats.samples.items(), key=lambda kv: (kv[1].kind, kv[0])):
        for task, png in sorted(sample.pngs.items()):
            name = f"{sensor}-{frame_id}-{task}.png"
            (images / name).write_bytes(_scaled_png(png))
            body = sample.results.get(task, {})
            experts = ", ".join(e["id"] for e in body.get("experts", []) if e.get("status") == "ok")
            figures.append(
                f'<figure><img src="images/{name}"><figcaption>{html.escape(sensor)} frame {frame_id}: '
                f"{html.escape(task)} by {html.escape(experts)}, {body.get('latency_ms', 0):.0f} ms"
                "</figcaption></figure>"
            )
        if sample.image is not None and "detection" in sample.results:
            name = f"{sensor}-{frame_id}-detection.jpg"
            body = sample.results["detection"]
            (images / name).write_bytes(_overlay(sample.image, body, font_path))
            count = len(body.get("output", {}).get("items", []))
            figures.append(
                f'<figure><img src="images/{name}" class="photo">'
                f"<figcaption>{html.escape(sensor)} frame {frame_id}: "
                f"{count} detections, {body.get('latency_ms', 0):.0f} ms</figcaption></figure>"
            )
    fleet_rows = "".join(
        f"<tr><td>{html.escape(n['name'])}</td><td>{n['threads']}</td>"
        f"<td>{html.escape(', '.join(n['experts']))}</td></tr>"
        for n in fleet
    )
    errors = "".join(f"<li>{html.escape(json.dumps(e))}</li>" for e in stats.error_examples)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>moesaic demo report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
figure {{ display: inline-block; margin: 8px; vertical-align: top; }}
figure img {{ image-rendering: pixelated; max-width: 420px; border: 1px solid #ccc; }}
figure img.photo {{ image-rendering: auto; max-width: 640px; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; border: 1px solid #999; }}
</style></head><body>
<h1>moesaic demo</h1>
<p>{stats.frames} frames replayed through MQTT ({html.escape(_sent(stats))}),
{stats.budget_met_percent():.0f}% of results within their budget, {stats.total_dropped} frames dropped by the
bridge's latest-frame queues, {sum(stats.errors.values())} errors.</p>
{"".join(f"<p>{html.escape(n)}</p>" for n in notes or [])}
<h2>Per task</h2>
<table><tr><th>task</th><th>results</th><th>budget met</th><th>mean latency ms</th>
<th>mean end-to-end ms</th><th>mean energy mJ</th><th>experts chosen</th></tr>{"".join(rows)}</table>
<h2>Fleet</h2>
<table><tr><th>node</th><th>threads</th><th>experts</th></tr>{fleet_rows}</table>
<h2>Outputs</h2>
<p>BEV classes: {_palette_legend(class_names) if class_names else "class ids"}</p>
{"".join(figures) or "<p>no images were kept</p>"}
{f"<h2>Errors (first 5)</h2><ul>{errors}</ul>" if errors else ""}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index
