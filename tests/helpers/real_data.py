"""Where the real KITTI and nuScenes recordings live: ``shared/data/real`` beside the clone.

They are non-commercial fixtures, read in place and never copied into the repository.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL_DATA = next(
    (p for p in (REPO.parent / "shared" / "data" / "real", Path("/work/shared/data/real")) if p.is_dir()),
    REPO.parent / "shared" / "data" / "real",
)
