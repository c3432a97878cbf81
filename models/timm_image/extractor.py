"""Frame-wise features of any timm image model: every frame (at the chosen fps) -> the pooled
pre-logits, ``forward_head(forward_features(x), pre_logits=True)``.

That is the classifier's input: the pooled (and, where the model has them, normed / MLP-ed)
features: the class token or average for ViTs, the attention-pool output for SigLIP towers,
global average + norm for ConvNeXt. Frames are preprocessed as timm's eval transform of the
model's pretrained config (models/timm_image/preprocess.py). ``show_pred`` prints the top-5
classes of the model's own classifier, computed in the same forward pass.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np
import torch

from video_features.models.base import CropOptions, Extractor
from video_features.models.timm_image.preprocess import CROP_MODES, preprocess
from video_features.models.timm_image.weights import (build_model, card_for, class_names, recipe_for,
                                       source_for, weights_file)
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.weights import use_random_weights

log = logging.getLogger(__name__)

#: show_pred: columns put in front of each feature row by ``forward`` (top-k probs, indices)
TOP_K = 5


@dataclasses.dataclass
class TimmOptions(CropOptions):
    model_name: str = option(
        "a timm model, architecture.pretrained_tag (vit_base_patch16_224.augreg_in21k, "
        "convnext_base.fb_in22k_ft_in1k, vit_base_patch16_siglip_224.v2_webli, ...) or an "
        "architecture alone (its default tag); see timm.list_pretrained(). Features: the pooled "
        "pre-logits, forward_head(pre_logits=True)", changes_values=True)
    crop_pct: Optional[float] = option(
        "eval resize = input size / crop_pct before the centre crop; null: the pretrained "
        "config's (e.g. 0.9 for ViTs and timm's SigLIP towers, 0.875 ConvNeXt)", above=0,
        changes_values=True)
    crop_mode: Optional[str] = option(
        "center: keep the aspect, resize the shorter side, centre crop; squash: resize both "
        "sides (aspect not kept; with crop_pct=1 as SigLIP / open_clip do); border: fit the "
        "whole frame, pad with the mean; null: the pretrained config's",
        choices=CROP_MODES, changes_values=True)


class TimmExtractor(Extractor):
    output_keys = ("timm", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 8, "cuda": 64}
    schema = TimmOptions
    frame_seam = True

    @classmethod
    def validate(cls, cfg: Config) -> Config:
        source = source_for(cfg.model_name)
        recipe = recipe_for(source, None, cfg.get("crop_pct"), cfg.get("crop_mode"))
        if cfg.show_pred and not source.num_classes:
            raise ConfigError(f"option show_pred: timm {source.name} has no classifier "
                              "(num_classes 0: a feature-only model such as a SigLIP tower or an "
                              "in21k model without head); use a tag with one or show_pred=false")
        # the values used, so that the record of each output holds them
        return cfg.replace(crop_pct=recipe.crop_pct, crop_mode=recipe.crop_mode)

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        source = source_for(cfg.model_name)
        return {"timm": (card_for(source), weights_file(cfg, source))}

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        source = source_for(cfg.model_name)
        random = use_random_weights(cfg.allow_random_weights, cfg.checkpoint_path,
                                    f"timm {source.name}")
        path = None if random else weights_file(cfg, source)
        # only a URL-only tag's own release file may need its custom loader (.npz)
        timm_layout = bool(cfg.checkpoint_path) or source.hub_repo is not None
        self.model = build_model(source, path, timm_layout).to(self.device)
        import timm.data

        self.recipe = recipe_for(source, timm.data.resolve_model_data_config(self.model),
                                 cfg.get("crop_pct"), cfg.get("crop_mode"))
        if self.views > 1 and self.recipe.crop_mode == "squash" and self.recipe.scale == self.recipe.size:
            raise ConfigError(f"crops={cfg.crops}: timm {source.name} squashes frames to its "
                              "input size (crop_pct 1), so there is nothing to crop; set crop_pct "
                              "below 1 or crop_mode=center")
        self.show_pred = bool(cfg.show_pred)
        self.labels = class_names(self.model) if self.show_pred else []
        log.info("timm %s: %s", source.name, self.recipe.describe())

    def chunk_frames(self) -> int:
        return self.cfg.batch_size

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        return [("timm", preprocess(frames, self.recipe, self.cfg.crops), stamps)]

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(batch)
        pooled = self.model.forward_head(tokens, pre_logits=True)
        if not self.show_pred:
            return pooled
        # the model's own head on the same tokens (exact for every timm head, distilled ones
        # included); only the top-k travel with the rows, so memory stays per frame
        probs = torch.softmax(self.model.forward_head(tokens).float(), dim=-1)
        top_p, top_i = probs.topk(min(TOP_K, probs.shape[-1]), dim=-1)
        return torch.cat([top_p, top_i.float(), pooled.float()], dim=1)

    def _print_top(self, title: str, top: torch.Tensor) -> None:
        k = top.shape[1] // 2
        for s in range(0, len(top), 256):   # bounded: one small probs block at a time
            part = top[s:s + 256].float().cpu()
            probs = torch.full((len(part), len(self.labels)), -1.0)
            probs.scatter_(1, part[:, k:].long(), part[:, :k])
            self.print_predictions(title, probs, self.labels, k=k, first=s)

    @torch.inference_mode()
    def finish(self, work) -> dict[str, np.ndarray]:
        feats, stamps = rows_of(work, "timm")
        if feats is None:
            raise VideoError("no frames to extract features from")
        if self.show_pred:
            k = min(TOP_K, len(self.labels))
            # only the top-k of each view travel with the rows: with crops, the centre view's
            top = feats[:, :2 * k] if self.views == 1 else feats[:, 4, :2 * k]
            self._print_top(f"{work.path} frame", top)
            feats = feats[..., 2 * k:]
        return {"timm": feats.float().cpu().numpy(), "fps": np.array(work.fps, dtype=np.float64),
                "timestamps_ms": self.row_times(work, stamps)}
