"""The training progress bar: in a log (not a terminal) a line per tenth of the work with the ETA."""

from __future__ import annotations

import io
import re

from moesaic.runtime.progress import TrainingProgress, format_seconds


def test_log_lines_every_tenth_with_an_eta() -> None:
    stream = io.StringIO()
    with TrainingProgress("train ppn seg", total=50, stream=stream) as bar:
        for step in range(1, 51):
            bar.advance(note=f"step {step}/50 loss 0.5")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert re.fullmatch(
        r"train ppn seg  10% 5/50  step 5/50 loss 0.5  elapsed \d:\d\d:\d\d  ETA \d:\d\d:\d\d", lines[0]
    )
    assert lines[-1].startswith("train ppn seg 100% 50/50") and lines[-1].endswith("ETA 0:00:00")


def test_a_total_learnt_late_and_an_early_stop() -> None:
    stream = io.StringIO()
    with TrainingProgress("train detector", total=1, stream=stream) as bar:
        bar.total = 4  # the batch count is known once the data loader exists
        bar.advance()
        bar.advance()
    (first, last) = stream.getvalue().splitlines()  # 25% is past a tenth; the end shows where it stopped
    assert " 25% 1/4" in first and " 50% 2/4" in last


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (0, 59.6, 3725)] == ["0:00:00", "0:01:00", "1:02:05"]
