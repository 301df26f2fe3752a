"""Configure ultralytics so it never touches the network or pip, then import it.

ultralytics phones home in several places: an analytics ``sync`` setting, a DNS probe that
decides whether it may auto-install missing requirements, a font check that downloads
``Arial.ttf`` the first time it draws, and hub/integration callbacks. :func:`import_ultralytics`
switches all of them off with ultralytics' own documented switches, BEFORE its first import:

- ``YOLO_OFFLINE=1``: ``ultralytics.utils.ONLINE`` is False, so no analytics events and no
  AutoUpdate (``check_requirements`` refuses to install and only warns);
- ``YOLO_AUTOINSTALL=False``: requirement checks never call pip;
- ``YOLO_CONFIG_DIR``: a moesaic-owned settings folder (unless the user set one); the
  bundled DejaVu Sans (``moesaic/assets/fonts``, Bitstream Vera licence) is copied into
  ultralytics' resolved ``USER_CONFIG_DIR`` as ``Arial.ttf`` and ``Arial.Unicode.ttf``, so
  ``check_font`` finds a local file and never downloads;
- settings ``sync=False`` and every experiment-tracker integration off.

Call it instead of ``import ultralytics`` everywhere in moesaic::

    from moesaic.models.detector.offline import import_ultralytics
    ultralytics = import_ultralytics()
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from moesaic.runtime.engine import MissingExtraError

__all__ = [
    "BUNDLED_FONT",
    "OFFLINE_SETTINGS",
    "configure_environment",
    "import_ultralytics",
    "ultralytics_config_dir",
]

BUNDLED_FONT = "DejaVuSans.ttf"
_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")

OFFLINE_SETTINGS: dict[str, Any] = {
    "sync": False,
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}
"""ultralytics settings moesaic forces: no analytics, no experiment trackers, no tips."""


def ultralytics_config_dir() -> Path:
    """The settings folder ultralytics will use: ``$YOLO_CONFIG_DIR`` or moesaic's own."""
    if env := os.environ.get("YOLO_CONFIG_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "moesaic" / "ultralytics"


def _install_fonts(config_dir: Path) -> None:
    font = resources.files("moesaic").joinpath("assets", "fonts", BUNDLED_FONT)
    config_dir.mkdir(parents=True, exist_ok=True)
    with resources.as_file(font) as src:
        for name in _FONT_NAMES:
            dst = config_dir / name
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                shutil.copyfile(src, dst)


def configure_environment() -> Path:
    """Set the offline environment switches and install the bundled font; returns ``YOLO_CONFIG_DIR``.

    Safe to call many times. Does not import ultralytics.
    """
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    config_dir = ultralytics_config_dir()
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    _install_fonts(config_dir / "Ultralytics")
    return config_dir


def _apply_settings(module: ModuleType) -> None:
    utils = sys.modules["ultralytics.utils"]
    settings = utils.SETTINGS
    wanted = {k: v for k, v in OFFLINE_SETTINGS.items() if k in settings and settings[k] != v}
    if wanted:
        settings.update(wanted)
    # Imported before configure_environment ran (e.g. by user code): these module constants
    # were computed from the environment at import; bring them in line.
    checks = sys.modules.get("ultralytics.utils.checks")
    for mod in (utils, checks):
        if mod is not None:
            if getattr(mod, "ONLINE", False):
                mod.ONLINE = False  # type: ignore[attr-defined]
            if getattr(mod, "AUTOINSTALL", False):
                mod.AUTOINSTALL = False  # type: ignore[attr-defined]


def import_ultralytics() -> ModuleType:
    """Import ultralytics configured for no network and no pip; ``MissingExtraError`` when absent."""
    configure_environment()
    try:
        import ultralytics
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] != "ultralytics":
            raise
        raise MissingExtraError("ultralytics", "vision") from None
    # The settings folder ultralytics resolved (it may fall back to /tmp, or have been fixed
    # by an earlier import): the font must live exactly there.
    _install_fonts(Path(sys.modules["ultralytics.utils"].USER_CONFIG_DIR))
    _apply_settings(ultralytics)
    return ultralytics
