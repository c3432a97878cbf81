"""Feature type name -> extractor class, imported lazily so that one family's dependencies
(e.g. tensorflow for converting VGGish checkpoints) never burden another."""
from __future__ import annotations

import importlib

from utils.errors import ConfigError

_EXTRACTORS = {
    "resnet": "models.resnet.extractor:ResNetExtractor",
    "i3d": "models.i3d.extractor:I3DExtractor",
    "r21d": "models.r21d.extractor:R21DExtractor",
    "vggish": "models.vggish.extractor:VGGishExtractor",
}


def feature_types() -> list[str]:
    return list(_EXTRACTORS)


def get_extractor_class(feature_type: str) -> type:
    try:
        target = _EXTRACTORS[feature_type]
    except KeyError:
        raise ConfigError(f"feature_type {feature_type!r} is unknown; choose one of "
                          f"{', '.join(_EXTRACTORS)}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
