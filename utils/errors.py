"""Exception types that carry a one-line, user-facing reason.

The runner prints ``str(exc)`` of these as the reason a video failed (or the run could not
start), so the message must stand on its own: what is wrong and, where possible, what to do.
"""


class FeatureError(Exception):
    """Base class of the errors this tool reports to users without a traceback."""


class ConfigError(FeatureError):
    """An option has an invalid value or combination; raised before any model is loaded."""


class VideoError(FeatureError):
    """One input cannot be processed (missing, not a video, corrupt, too short, no audio)."""


class WeightsError(FeatureError):
    """A checkpoint cannot be found, downloaded, verified or does not fit the network."""
