"""Frame-wise CLIP features: every frame (at the chosen fps) -> its image embedding.

The embedding is the image tower's output after its projection (``encode_image``), NOT
L2-normalised, as the reference tool saves it. ``show_pred`` ranks texts by cosine similarity
(zero-shot): Kinetics-400 prompts "a photo of {class}" or the user's ``pred_texts``; softmax
over the texts for CLIP, sigmoid with the model's bias for SigLIP.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np
import torch

from video_features.models.base import CropOptions, Extractor
from video_features.models.clip.preprocess import preprocess
from video_features.models.clip.weights import (OPENAI_NAMES, checkpoint_for, kinetics_prompts, load_clip,
                                 open_clip_module, source_for)
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError, VideoError, WeightsError
from video_features.utils.pipeline import rows_of
from video_features.utils.weights import use_random_weights


@dataclasses.dataclass
class CLIPOptions(CropOptions):
    model_name: str = option(
        "OpenAI CLIP (pretrained=openai): " + " | ".join(OPENAI_NAMES) + "; or an open_clip "
        "architecture with its pretrained tag (ViT-B-32, ViT-B-16-SigLIP, ViT-B-16-SigLIP2, ...). "
        "Features: the projected image embedding, not L2-normalised", changes_values=True)
    pretrained: str = option(
        "openai: OpenAI's released checkpoint of model_name; otherwise an open_clip pretrained "
        "tag of model_name (e.g. laion2b_s34b_b79k for ViT-B-32, webli for ViT-B-16-SigLIP), "
        "weights from the Hugging Face hub cache", changes_values=True)
    pred_texts: Optional[List[str]] = option(
        "show_pred: texts to rank for each frame (zero-shot); null: the Kinetics-400 classes as "
        "'a photo of {class}'")


class CLIPExtractor(Extractor):
    output_keys = ("clip", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 8, "cuda": 64}
    schema = CLIPOptions
    frame_seam = True

    @classmethod
    def validate(cls, cfg: Config) -> None:
        source_for(cfg)
        texts = cfg.get("pred_texts")
        if texts is not None and (not texts or not all(isinstance(t, str) and t.strip()
                                                       for t in texts)):
            raise ConfigError("option pred_texts: give one or more non-empty texts (or null)")

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        source = source_for(cfg)
        return {"clip": (source.card, checkpoint_for(cfg, source))}

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.source = source_for(cfg)
        random = use_random_weights(cfg.allow_random_weights, cfg.checkpoint_path,
                                    f"clip {cfg.model_name}")
        model = load_clip(self.source, None if random else checkpoint_for(cfg, self.source),
                          random)
        self.recipe = open_clip_module().get_model_preprocess_cfg(model)
        from video_features.models.clip.preprocess import recipe_from_cfg

        self.recipe = recipe_from_cfg(self.recipe)
        if self.views > 1 and self.recipe.resize_mode != "shortest":
            raise ConfigError(f"crops={cfg.crops}: {cfg.model_name} squashes frames to its input "
                              "size, so there is nothing to crop")
        model = model.to(self.device)
        if cfg.show_pred:
            self._prepare_texts(model)
        # only the image tower stays: the text tower is needed once, for show_pred
        self.visual = model.visual.eval()
        del model

    def _prepare_texts(self, model: torch.nn.Module) -> None:
        if self.cfg.get("pred_texts"):
            self.labels = list(self.cfg.pred_texts)
            prompts = self.labels
        else:
            self.labels, prompts = kinetics_prompts()
        try:
            tokenizer = open_clip_module().get_tokenizer(self.source.arch)
        except Exception as exc:  # SigLIP's tokenizers come from the Hugging Face hub
            raise WeightsError(f"show_pred: cannot load the tokenizer of {self.source.arch} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it "
                               "comes from the Hugging Face hub cache") from None
        feats = []
        with torch.inference_mode(), self.autocast():
            for s in range(0, len(prompts), 64):
                tokens = tokenizer(prompts[s:s + 64]).to(self.device)
                feats.append(model.encode_text(tokens).double())
        text = torch.cat(feats)
        self.text_feats = text / text.norm(dim=-1, keepdim=True)
        self.logit_scale = float(model.logit_scale.detach().exp())
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach())

    def chunk_frames(self) -> int:
        return self.cfg.batch_size

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        return [("clip", preprocess(frames, self.recipe, self.cfg.crops), stamps)]

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        return self.visual(batch)

    def zero_shot(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, D) image embeddings -> (N, texts) probabilities (float64)."""
        v = feats.to(self.text_feats.device, torch.float64)
        logits = self.logit_scale * (v / v.norm(dim=-1, keepdim=True)) @ self.text_feats.T
        if self.logit_bias is not None:   # SigLIP: each text on its own
            return torch.sigmoid(logits + self.logit_bias)
        return torch.softmax(logits, dim=-1)

    @torch.inference_mode()
    def finish(self, work) -> dict[str, np.ndarray]:
        feats, stamps = rows_of(work, "clip")
        if feats is None:
            raise VideoError("no frames to extract features from")
        if self.cfg.show_pred:
            self.print_predictions(f"{work.path} frame", self.over_views(self.zero_shot, feats),
                                   self.labels)
        return {"clip": feats.float().cpu().numpy(), "fps": np.array(work.fps, dtype=np.float64),
                "timestamps_ms": self.row_times(work, stamps)}
