"""VideoMAE clip features: clips of the model's num_frames (16) frames -> one pooled vector each
(768-d base, 1024-d large, 1280-d huge).

A preset of ``hf_video`` (models/hf_video/): the same processor on the device, windows and
pooling, with VideoMAE's own defaults, output key and weight rules: the MCG-NJU repos build from
a built-in table (random weights offline), a repo without preprocessor_config.json gets
VideoMAE's training preprocessing, VideoMAE V2 (remote code) is refused with a hint, and a
400-way head without names is labelled with Kinetics-400's classes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from video_features.models.base import StackOptions
from video_features.models.hf_video.extractor import HFVideoExtractor
from video_features.models.videomae.weights import (DEFAULT_MODEL, KINETICS_LABELS, KNOWN_MODELS,
                                                    V2_HINT, build_config, card_for, is_v2_name,
                                                    processor_for, resolve, weights_file_for)
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError

POOLINGS = ("auto", "fc_norm", "mean")


@dataclasses.dataclass
class VideoMAEOptions(StackOptions):
    stack_size: Optional[int] = option(
        "frames per clip; null: the model's num_frames (16 for the MCG-NJU models), the only "
        "length its fixed position embeddings fit", at_least=1, changes_values=True)
    model_name: str = option(
        f"Hugging Face repo id ({DEFAULT_MODEL}, MCG-NJU/videomae-large-finetuned-kinetics, "
        "MCG-NJU/videomae-base (self-supervised only), ...) or a local folder in transformers' "
        "layout (config.json + model.safetensors / pytorch_model.bin, preprocessor_config.json)",
        changes_values=True)
    revision: Optional[str] = option("hub revision (branch, tag or commit) of model_name; "
                                     "null: main", changes_values=True)
    pooling: str = option(
        "fc_norm: mean of the last hidden state over all tokens, then the fine-tuned model's "
        "fc_norm LayerNorm (the classifier's input, as VideoMAEForVideoClassification); mean: "
        "the plain token mean (after the encoder's final LayerNorm where it has one); auto: "
        "fc_norm where the checkpoint has it, else mean", choices=POOLINGS, changes_values=True)


class VideoMAEExtractor(HFVideoExtractor):
    output_keys = ("videomae", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 1, "cuda": 16}
    schema = VideoMAEOptions
    label = "videomae"

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        name = cfg.model_name
        if is_v2_name(name):
            raise ConfigError(f"model_name {name!r}: {V2_HINT}")
        if name in KNOWN_MODELS:
            if cfg.stack_size not in (None, 16):
                raise ConfigError(f"option stack_size={cfg.stack_size}: {name} takes clips of "
                                  "16 frames (its num_frames; fixed position embeddings)")
            if cfg.pooling == "fc_norm" and KNOWN_MODELS[name][1] is None:
                raise ConfigError(f"option pooling=fc_norm: {name} is self-supervised only and "
                                  "has no fc_norm; use pooling=mean or auto")

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"videomae": (card_for(cfg), weights_file_for(cfg))}

    def resolve(self, random: bool) -> Any:
        return resolve(self.cfg, random_weights=random)

    def load_config(self, src: Any) -> tuple[Any, Any, bool]:
        config = build_config(src)
        return config, processor_for(src, config), False

    def class_names(self, config: Any) -> list[str]:
        """The config's id2label where it holds real names, else the Kinetics-400 names for a
        400-way head, else the indices."""
        names = super().class_names(config)
        if names and not all(s == f"LABEL_{i}" for i, s in enumerate(names)):
            return names
        if len(names) == 400:
            return KINETICS_LABELS.read_text().splitlines()
        return [str(i) for i in range(len(names))]
