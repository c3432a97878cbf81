"""Exception types that carry a one-line, user-facing reason.

The runner prints ``str(exc)`` of these as the reason a video failed (or the run could not
start), so the message must stand on its own: what is wrong and, where possible, what to do.
"""
from __future__ import annotations

import errno
import os
import sys
from types import ModuleType


class FeatureError(Exception):
    """Base class of the errors this tool reports to users without a traceback."""


class ConfigError(FeatureError):
    """An option has an invalid value or combination; raised before any model is loaded."""


class VideoError(FeatureError):
    """One input cannot be processed (missing, not a video, corrupt, too short, no audio)."""


class WeightsError(FeatureError):
    """A checkpoint cannot be found, downloaded, verified or does not fit the network."""


def require(module: str, needed_by: str, pip: str | None = None,
            extra: str | None = None) -> ModuleType:
    """``module`` imported, or a ConfigError naming what needs it and the install command:
    "<needed_by> needs <pip> (<why the import failed>): pip install <pip> [(or the [extra]
    extra)]". ``pip``: the package (and version) to install, where not the module's name."""
    try:
        __import__(module)   # (not importlib: tests stand in for a missing package here)
        return sys.modules[module]
    except ImportError as exc:
        package = pip or module.split(".")[0]
        also = f" (or the [{extra}] extra)" if extra else ""
        raise ConfigError(f"{needed_by} needs {package} ({exc}): pip install {package}{also}") \
            from None


class OutputError(FeatureError):
    """An output cannot be written because of the output folder itself (full, over quota,
    read-only, no permission): every later write would meet the same error, so the run stops
    instead of failing each input in turn. ``stop_reason`` says so for the inputs not started."""

    #: errno -> what it means for the output folder
    STATES = {errno.ENOSPC: "is full (no space left on device)",
              errno.EDQUOT: "is over its disk quota",
              errno.EROFS: "is on a read-only file system",
              errno.EACCES: "is not writable (permission denied)"}

    def __init__(self, path: object, code: int | None, detail: str = "", folder: bool = False):
        self.path, self.errno, self.detail, self.is_folder = str(path), code, detail, folder
        self.folder = self.path if folder else os.path.dirname(self.path)
        why = (os.strerror(code) if code else detail or "cannot be written").lower()
        what = f"to the output folder {self.path}" if folder else self.path
        super().__init__(f"cannot write {what}: {why}")

    def __reduce__(self):  # picklable despite its signature
        return type(self), (self.path, self.errno, self.detail, self.is_folder)

    @property
    def stop_reason(self) -> str:
        state = self.STATES.get(self.errno, "cannot be written")
        return f"the output folder {self.folder} {state}"
