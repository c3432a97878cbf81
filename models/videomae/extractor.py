"""VideoMAE clip features through Hugging Face transformers: clips of the model's num_frames
(16) frames -> one pooled vector each (768-d base, 1024-d large, 1280-d huge).

The model's own image processor (VideoMAEImageProcessor, read from the repo's
preprocessor_config.json) is re-done on the device on whole chunks of frames, with the same
torchvision resize kernel, crop offsets and fused rescale/normalise arithmetic, so its output
equals the processor's on the same decoded frames. Frames are preprocessed once and then
windowed, so overlapping clips (step_size < stack_size, the usual setting for temporal action
localisation) share them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import numpy as np
import torch

from video_features.models.base import Extractor, StackOptions
from video_features.models.videomae.weights import (DEFAULT_MODEL, KINETICS_LABELS, KNOWN_MODELS, V2_HINT,
                                     build_config, build_network, card_for, import_transformers,
                                     is_v2_name, processor_for, resolve, weights_file_for)
from video_features.utils.hf_hub import read_state_dict
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.weights import use_random_weights
from video_features.utils.transforms import channel_constant, crop_views
from video_features.utils.windows import SlidingWindows, stack_windows

log = logging.getLogger(__name__)

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


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The settings of a VideoMAEImageProcessor, applied to (N, 3, H, W) uint8 device frames."""

    resize: tuple | None          # ("short", n) or ("hw", h, w)
    interpolation: Any            # torchvision InterpolationMode
    crop: tuple[int, int] | None
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, proc: Any) -> "Preprocess":
        from torchvision.transforms.v2 import InterpolationMode
        from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

        resize = None
        if proc.do_resize:
            size = proc.size
            if size.shortest_edge and not size.longest_edge:
                resize = ("short", int(size.shortest_edge))
            elif size.height and size.width:
                resize = ("hw", int(size.height), int(size.width))
            else:
                raise ConfigError(f"videomae: processor size {dict(size)} is not supported "
                                  "(shortest_edge, or height and width)")
        res = proc.resample
        if isinstance(res, InterpolationMode):
            mode = res
        elif isinstance(res, (PILImageResampling, int)):
            mode = pil_torch_interpolation_mapping[PILImageResampling(res)]
        elif isinstance(res, str):
            mode = InterpolationMode(res.lower())
        else:
            mode = InterpolationMode.BILINEAR
        crop = None
        if proc.do_center_crop:
            crop = (int(proc.crop_size.height), int(proc.crop_size.width))
        return cls(resize, mode, crop,
                   float(proc.rescale_factor) if proc.do_rescale else None,
                   tuple(float(m) for m in proc.image_mean) if proc.do_normalize else None,
                   tuple(float(s) for s in proc.image_std) if proc.do_normalize else None)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        if self.crop:
            return self.crop
        if self.resize and self.resize[0] == "hw":
            return self.resize[1], self.resize[2]
        return self.resized(h, w)

    def resized(self, h: int, w: int) -> tuple[int, int]:
        if self.resize is None:
            return h, w
        if self.resize[0] == "hw":
            return self.resize[1], self.resize[2]
        n = self.resize[1]  # shorter side -> n, longer truncated (transformers' rule)
        return (n, int(n * w / h)) if h <= w else (int(n * h / w), n)

    def __call__(self, frames: torch.Tensor, crops: str = "center") -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, h, w) float32, as the processor computes it; 5 / 10
        crops in place of its centre crop: ``(N, V, 3, h, w)`` (utils.transforms.crop_views)."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        x = frames.contiguous()
        h, w = x.shape[-2:]
        if self.resize is not None:
            mode = self.interpolation
            if mode == InterpolationMode.LANCZOS and x.device.type != "cpu":
                mode = InterpolationMode.BICUBIC  # what transformers falls back to off the CPU
            x = tvF.resize(x, list(self.resized(h, w)), interpolation=mode, antialias=True)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if ch > h or cw > w:  # padded with zeros first, as the processor does
                pad = [max(cw - w, 0) // 2, max(ch - h, 0) // 2,
                       (max(cw - w, 0) + 1) // 2, (max(ch - h, 0) + 1) // 2]
                x = tvF.pad(x, pad, fill=0)
                h, w = x.shape[-2:]
            top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
            x = crop_views(x, (ch, cw), crops, lambda y: y[..., top:top + ch, left:left + cw])
        x = x.to(torch.float32)
        if self.mean is not None:
            mean, std = channel_constant(self.mean, x), channel_constant(self.std, x)
            if self.rescale is not None:  # rescale folded into mean/std, as the processor does
                mean, std = mean * (1.0 / self.rescale), std * (1.0 / self.rescale)
            return (x - mean) / std
        return x * self.rescale if self.rescale is not None else x


def _labels(config: Any) -> list[str]:
    """Class names of the classification head: the config's id2label where it holds real names,
    else the Kinetics-400 names for a 400-way head, else the indices."""
    n = int(getattr(config, "num_labels", 0) or 0)
    names = [str((config.id2label or {}).get(i, "")) for i in range(n)]
    if n and all(names) and not all(s == f"LABEL_{i}" for i, s in enumerate(names)):
        return names
    if n == 400:
        return KINETICS_LABELS.read_text().splitlines()
    return [str(i) for i in range(n)]


class VideoMAEExtractor(Extractor):
    output_keys = ("videomae", "fps", "timestamps_ms")
    auto_batch_size = {"cpu": 1, "cuda": 16}
    schema = VideoMAEOptions

    @classmethod
    def validate(cls, cfg: Config) -> None:
        name = cfg.model_name
        if not name:
            raise ConfigError("option model_name is empty: give a Hugging Face repo id or a folder")
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

    frame_seam = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        tf = import_transformers()
        self.validate(cfg)
        random = use_random_weights(cfg.allow_random_weights, cfg.checkpoint_path,
                                    f"videomae {cfg.model_name}")
        src = resolve(cfg, random_weights=random)
        config = build_config(src)
        net = build_network(config, None if random else read_state_dict(src.weights))
        self.config = config
        self.stack = int(cfg.stack_size or config.num_frames)
        if self.stack != config.num_frames:
            raise ConfigError(f"option stack_size={self.stack}: {src.model_id} takes clips of "
                              f"num_frames={config.num_frames} frames (fixed position embeddings)")
        self.preprocess = Preprocess.from_processor(processor_for(src, config))
        size = config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        fixed = self.preprocess.resize and self.preprocess.resize[0] == "hw"
        if not self.preprocess.crop and not fixed:
            raise ConfigError(f"videomae: the processor of {src.model_id} neither crops nor "
                              "resizes to a fixed size; the model needs "
                              f"{size[0]}x{size[1]} frames")
        if self.views > 1 and not self.preprocess.crop:
            raise ConfigError(f"crops={cfg.crops}: the processor of {src.model_id} resizes "
                              "frames to the model's input size, so there is nothing to crop")
        if self.preprocess.out_size(0, 0) != size:
            raise ConfigError(f"videomae: the processor of {src.model_id} gives "
                              f"{self.preprocess.out_size(0, 0)} frames, the model takes {size}")
        classify = isinstance(net, tf.VideoMAEForVideoClassification)
        self.encoder = (net.videomae if classify else net).to(self.device)
        self.fc_norm = net.fc_norm.to(self.device) if classify and net.fc_norm is not None else None
        self.classifier = net.classifier.to(self.device) if classify else None
        pooling = cfg.pooling
        if pooling == "auto":
            pooling = "fc_norm" if self.fc_norm is not None else "mean"
        if pooling == "fc_norm" and self.fc_norm is None:
            raise ConfigError(f"option pooling=fc_norm: {src.model_id} has no fc_norm "
                              "(self-supervised only); use pooling=mean or auto")
        self.pooling = pooling
        self.labels = _labels(config) if cfg.show_pred and self.classifier is not None else []
        if cfg.show_pred and self.fc_norm is None:
            log.warning("show_pred: %s has no mean-pooling classification head; no predictions",
                        src.model_id)
        self.net = net.eval()
        log.info("videomae %s: %d frames/clip, %s pooling, %d-d features", src.model_id,
                 self.stack, self.pooling, config.hidden_size)

    def chunk_frames(self) -> int:
        return max(self.cfg.step_size, 16)

    def begin(self, work) -> None:
        work.state = SlidingWindows(self.stack, self.cfg.step_size, self.cfg.tail)

    @staticmethod
    def _stacks(windows: list) -> list:
        stacked = stack_windows(windows)
        return [("videomae", *stacked)] if stacked else []

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        return self._stacks(work.state.push(self.preprocess(frames, self.cfg.crops), stamps))

    def end_frames(self, work, end_s: float | None = None) -> list:
        return self._stacks(work.state.finish())

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) clips -> (B, D) pooled features."""
        hidden = self.encoder(pixel_values=batch).last_hidden_state
        pooled = hidden.mean(1)
        return self.fc_norm(pooled) if self.pooling == "fc_norm" else pooled

    @torch.inference_mode()
    def finish(self, work) -> dict[str, np.ndarray]:
        feats, stamps = rows_of(work, "videomae")
        if feats is None:
            raise VideoError(f"too short: fewer than stack_size={self.stack} frames "
                             f"({work.frames} at {work.fps:g} fps)")
        if self.cfg.show_pred and self.fc_norm is not None:
            def predict(x: torch.Tensor) -> torch.Tensor:
                x = x.to(self.device)
                x = x if self.pooling == "fc_norm" else self.fc_norm(x)
                return torch.softmax(self.classifier(x), -1)

            self.print_predictions(f"{work.path} clip", self.over_views(predict, feats), self.labels)
        return {"videomae": feats.float().cpu().numpy(),
                "fps": np.array(work.fps, dtype=np.float64), "timestamps_ms": self.row_times(work, stamps)}
