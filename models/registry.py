"""Feature type name -> extractor class, imported lazily so that one family's dependencies
(e.g. tensorflow for converting VGGish checkpoints) never burden another.

Feature types of your own can be added without editing the package: set
``VIDEO_FEATURES_PLUGINS="name=package.module:ClassName,..."`` (worker processes inherit it). The
class subclasses :class:`models.base.Extractor`; its ``schema`` dataclass carries the defaults of
options that configs/ does not know.
"""
from __future__ import annotations

import importlib
import os

from video_features.utils.errors import ConfigError

_EXTRACTORS = {
    "resnet": "video_features.models.resnet.extractor:ResNetExtractor",
    "i3d": "video_features.models.i3d.extractor:I3DExtractor",
    "r21d": "video_features.models.r21d.extractor:R21DExtractor",
    "vggish": "video_features.models.vggish.extractor:VGGishExtractor",
    "null": "video_features.models.null.extractor:NullExtractor",
    "s3d": "video_features.models.s3d.extractor:S3DExtractor",
    "tv_video": "video_features.models.tv_video.extractor:TVVideoExtractor",
    "clip": "video_features.models.clip.extractor:CLIPExtractor",
    "timm": "video_features.models.timm_image.extractor:TimmExtractor",
    "videomae": "video_features.models.videomae.extractor:VideoMAEExtractor",
    "clap": "video_features.models.clap.extractor:CLAPExtractor",
    "raft": "video_features.models.flow_out.extractor:RAFTFlowExtractor",
    "pwc": "video_features.models.flow_out.extractor:PWCFlowExtractor",
    "tvl1": "video_features.models.flow_out.extractor:TVL1FlowExtractor",
}

PLUGINS_ENV = "VIDEO_FEATURES_PLUGINS"


def _all() -> dict[str, str]:
    out = dict(_EXTRACTORS)
    for item in os.environ.get(PLUGINS_ENV, "").split(","):
        if not item.strip():
            continue
        name, sep, target = item.strip().partition("=")
        if not sep or ":" not in target:
            raise ConfigError(f"{PLUGINS_ENV}: cannot read {item!r}; expected name=module:Class")
        out[name.strip()] = target.strip()
    return out


def feature_types() -> list[str]:
    return list(_all())


def get_extractor_class(feature_type: str) -> type:
    types = _all()
    try:
        target = types[feature_type]
    except KeyError:
        raise ConfigError(f"feature_type {feature_type!r} is unknown; choose one of "
                          f"{', '.join(types)}") from None
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        if feature_type in _EXTRACTORS:
            raise
        raise ConfigError(f"feature_type {feature_type}: cannot import {target} ({exc})") from None
