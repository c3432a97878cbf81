"""Clip features of any transformers video model (V-JEPA 2, TimeSformer, ViViT, X-CLIP's video
tower, VideoMAE, and models that ship their own code), by hub repo id or local folder.

Clips hold the model's own number of frames (its config's ``num_frames`` / ``frames_per_clip``),
preprocessed on the device by the model's own processor (models/hf_video/preprocess.py); each
clip's tokens are pooled into one vector as its model card or classification head does
(models/hf_video/families.py). Frames are preprocessed once and then windowed, so overlapping
clips share them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import numpy as np
import torch

from video_features.models.base import Extractor, StackOptions
from video_features.models.hf_video import weights as hw
from video_features.models.hf_video.families import POOLINGS, Family, Generic, family_for
from video_features.models.hf_video.preprocess import OnDevice
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.weights import use_random_weights
from video_features.utils.windows import SlidingWindows, stack_windows

log = logging.getLogger(__name__)


@dataclasses.dataclass
class HFVideoOptions(StackOptions):
    model_name: str = option(
        f"Hugging Face repo id ({hw.DEFAULT_MODEL}, facebook/timesformer-base-finetuned-k400, "
        "google/vivit-b-16x2-kinetics400, microsoft/xclip-base-patch32, "
        "MCG-NJU/videomae-base, ...) or a local folder in transformers' layout (config.json, "
        "model.safetensors, video_preprocessor_config.json or preprocessor_config.json)",
        changes_values=True)
    revision: Optional[str] = option("hub revision (branch, tag or commit) of model_name; "
                                     "null: main", changes_values=True)
    stack_size: Optional[int] = option(
        "frames per clip; null: the model's own (num_frames / frames_per_clip of its config)",
        at_least=1, changes_values=True)
    step_size: Optional[int] = option(
        "frames between the starts of consecutive clips; null: stack_size (clips side by side)",
        at_least=1, changes_values=True)
    pooling: str = option(
        "tokens -> one vector per clip. auto: the model card's / classification head's (V-JEPA 2 "
        "mean, TimeSformer and ViViT cls, VideoMAE fc_norm where fine-tuned, X-CLIP mit); "
        "cls: class token; mean: patch-token mean; attentive: V-JEPA 2's attentive pooler "
        "(classification checkpoints); fc_norm: VideoMAE's head norm; mit: X-CLIP's video "
        "embedding; pooler: the model's pooler_output (models with their own code)",
        choices=POOLINGS, changes_values=True)
    trust_remote_code: bool = option(
        "run network code that a repo ships (auto_map in its config.json, e.g. InternVideo2); "
        "refused otherwise", changes_values=True)


def pooling_for(family: Family, net: Any, asked: str, model_id: str) -> str:
    have = family.available(net)
    if asked == "auto":
        return have[0]
    if asked not in have:
        raise ConfigError(f"option pooling={asked}: {model_id} ({type(net).__name__}) pools by "
                          f"{' | '.join(have)}")
    return asked


class HFVideoExtractor(Extractor):
    output_keys = ("hf_video", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 1, "cuda": 8}
    schema = HFVideoOptions
    frame_seam = True
    #: how weight errors and the card name the feature type (a preset names itself)
    label = "hf_video"

    @classmethod
    def validate(cls, cfg: Config) -> None:
        if not cfg.model_name:
            raise ConfigError("option model_name is empty: give a Hugging Face repo id or a folder")

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {cls.label: (hw.card_for(cfg, cls.label), hw.weights_file_for(cfg, cls.label))}

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        tf = hw.import_transformers(self.label)
        self.validate(cfg)
        random = use_random_weights(cfg.allow_random_weights, cfg.checkpoint_path,
                                    f"{self.label} {cfg.model_name}")
        src = self.resolve(random)
        config, processor, remote = self.load_config(src)
        known = None if remote else family_for(config.model_type)
        cls = known.network_class(tf, config) if known else tf.AutoModel
        net = hw.load_network(cls, config, src, None if random else hw.explicit_state(src, cfg),
                              remote)
        self.family = known or Generic(net)
        if known is None:
            log.info("%s: %s is not one of the model types with a known pooling (%s); features "
                     "are its pooler_output, or its token mean", self.label, config.model_type,
                     ", ".join(("videomae", "timesformer", "vivit", "vjepa2", "xclip")))
        self.pooling = pooling_for(self.family, net, cfg.pooling, src.model_id)
        self.net = self.prune(net).to(self.device).eval()
        frames = self.family.frames(config, processor)
        self.stack = int(cfg.stack_size or frames or 0)
        if not self.stack:
            raise ConfigError(f"{src.model_id}: its config gives no frames per clip; set "
                              "stack_size")
        if self.family.fixed_frames and self.stack != frames:
            raise ConfigError(f"option stack_size={self.stack}: {src.model_id} takes clips of "
                              f"{frames} frames (fixed position embeddings)")
        self.step = int(cfg.step_size or self.stack)
        self.preprocess = OnDevice(processor)
        self.check_sizes(config, src.model_id)
        head = self.family.head(self.net, self.pooling)
        self.head = head if cfg.show_pred else None
        self.labels = self.class_names(config) if self.head is not None else []
        if cfg.show_pred and head is None:
            log.warning("show_pred: %s has no classifier on %s-pooled features; no predictions",
                        src.model_id, self.pooling)
        log.info("%s %s: %d frames/clip, %s pooling", self.label, src.model_id, self.stack,
                 self.pooling)

    # -- hooks a preset (videomae) replaces --------------------------------------------------
    def resolve(self, random: bool) -> Any:
        return hw.resolve(self.cfg, random, self.label)

    def load_config(self, src: Any) -> tuple[Any, Any, bool]:
        """(config, processor, whether the repo's own code runs)."""
        remote = hw.check_remote_code(hw.read_raw_config(src), src.model_id,
                                      bool(self.cfg.trust_remote_code))
        return hw.build_config(src, remote), hw.processor_for(src, remote), remote

    def class_names(self, config: Any) -> list[str]:
        n = int(getattr(config, "num_labels", 0) or 0)
        return [str((config.id2label or {}).get(i, i)) for i in range(n)]

    # ------------------------------------------------------------------------------------------
    def prune(self, net: Any) -> Any:
        """Parts that take no part in video features are dropped (X-CLIP's text tower)."""
        if self.family.model_type == "xclip":
            for part in ("text_model", "text_projection", "prompts_generator"):
                setattr(net, part, None)
        return net

    def check_sizes(self, config: Any, model_id: str) -> None:
        size = self.family.image_size(config)
        got = self.preprocess.out_size(480, 640)
        if size is not None and got != size:
            raise ConfigError(f"{self.label}: the processor of {model_id} gives {got[0]}x{got[1]} "
                              f"frames, the model takes {size[0]}x{size[1]}")
        if self.views > 1 and not self.preprocess.crop:
            raise ConfigError(f"crops={self.cfg.crops}: the processor of {model_id} resizes "
                              "frames to the model's input size, so there is nothing to crop")

    def chunk_frames(self) -> int:
        return max(self.step, 16)

    def begin(self, work) -> None:
        work.state = SlidingWindows(self.stack, self.step, self.cfg.tail)

    def _stacks(self, windows: list) -> list:
        stacked = stack_windows(windows)
        return [(self.output_keys[0], *stacked)] if stacked else []

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        return self._stacks(work.state.push(self.preprocess(frames, self.cfg.crops), stamps))

    def end_frames(self, work, end_s: float | None = None) -> list:
        return self._stacks(work.state.finish())

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) clips -> (B, D) pooled features."""
        return self.family.features(self.net, batch, self.pooling)

    @torch.inference_mode()
    def finish(self, work) -> dict[str, np.ndarray]:
        key = self.output_keys[0]
        feats, stamps = rows_of(work, key)
        if feats is None:
            raise VideoError(f"too short: fewer than stack_size={self.stack} frames "
                             f"({work.frames} at {work.fps:g} fps)")
        if self.head is not None:
            def predict(x: torch.Tensor) -> torch.Tensor:
                return torch.softmax(self.head(x.to(self.device)), -1)

            self.print_predictions(f"{work.path} clip", self.over_views(predict, feats), self.labels)
        return {key: feats.float().cpu().numpy(), "fps": np.array(work.fps, dtype=np.float64),
                "timestamps_ms": self.row_times(work, stamps)}
