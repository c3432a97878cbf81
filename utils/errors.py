"""Exception types that carry a one-line, user-facing reason.

The runner prints ``str(exc)`` of these as the reason a video failed (or the run could not
start), so the message must stand on its own: what is wrong and, where possible, what to do.
"""
from __future__ import annotations

import errno
import os


class FeatureError(Exception):
    """Base class of the errors this tool reports to users without a traceback."""


class ConfigError(FeatureError):
    """An option has an invalid value or combination; raised before any model is loaded."""


class VideoError(FeatureError):
    """One input cannot be processed (missing, not a video, corrupt, too short, no audio)."""


class WeightsError(FeatureError):
    """A checkpoint cannot be found, downloaded, verified or does not fit the network."""



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
