"""``feature_type=vggish``: the audio track -> ``Ta x 128`` VGGish embeddings of 0.96 s examples,
one every ``hop_s`` (0.96: back to back, as the original and the reference tool).

On the pipeline (utils/pipeline.py): decoder processes decode and resample the audio to 16 kHz
mono (:func:`utils.audio.iter_audio`) and hand it over in shared memory; on the device the
log-mel front end (:mod:`models.vggish.mel`) turns each part into the 0.96 s examples it
completes, and examples of several inputs go through the network ``batch_size`` at a time.
Memory holds the embeddings and less than one example of pending audio per input.

Output ``vggish``:

* ``postprocess: false`` (default) - float32 ``(Ta, 128)``, the embedding after the network's final
  ReLU, as the reference tool (and the PyTorch port) emit it;
* ``postprocess: true`` - uint8 ``(Ta, 128)`` in AudioSet's released form: the official
  post-processing (PCA with whitening, clip to [-2, 2], 8-bit quantisation) applied, as Google's
  TensorFlow code does, to the pre-activation embedding (before that ReLU).

Row ``i`` covers audio ``[hop_s i, hop_s i + 0.96)`` s (its STFT windows read 15 ms more),
saved as ``timestamps_ms`` ``(Ta, 2)``; ``timestamps_form=reference`` saves no timestamps, as
the reference tool. Audio after the last complete example is not used. Audio shorter than 0.975 s (one example with its STFT window) is an error for the
input, not an empty array.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from video_features.models.base import Extractor
from video_features.models.vggish.mel import (EXAMPLE_SECONDS, EXAMPLE_SPAN, HOP, HOP_SECONDS, SAMPLE_RATE,
                               LogMelExamples, num_examples, samples_for)
from video_features.models.vggish.net import PCAQuantizer
from video_features.models.vggish.weights import PCA_CARD, VGGISH_CARD, build_vggish, load_pca, tf_checkpoint_prefix
from video_features.utils.config import SharedOptions, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VGGishOptions(SharedOptions):
    postprocess: bool = option(
        "false: raw 128-d embedding after the final ReLU, float32 (as the reference tool); true: "
        "AudioSet's released form, PCA + whitening + 8-bit quantisation of the pre-activation "
        "embedding, uint8", changes_values=True)
    pca_path: Optional[str] = option(
        "PCA parameters for postprocess (.pth of the PyTorch port or Google's "
        "vggish_pca_params.npz); default: torch hub cache, then a verified download")
    hop_s: float = option(
        "seconds between the starts of consecutive 0.96 s examples, a multiple of 0.01 (0.96: "
        "back to back, as the reference; e.g. 0.5 to put rows on a visual grid)",
        changes_values=True)
    keep_priming: bool = option(
        "keep the audio encoder's priming samples at the start (the reference tool's behaviour: "
        "its features are shifted by ~21-23 ms for AAC); default drops them like every player",
        changes_values=True)


def hop_frames(hop_s: float) -> int:
    """``hop_s`` in 10 ms log-mel frames; ValueError unless it is a positive multiple of 10 ms."""
    frames = round(float(hop_s) / HOP_SECONDS)
    if frames < 1 or abs(frames * HOP_SECONDS - float(hop_s)) > 1e-9:
        raise ValueError(hop_s)
    return frames


class VGGishExtractor(Extractor):
    schema = VGGishOptions

    @classmethod
    def output_keys_for(cls, cfg: Any) -> tuple[str, ...]:
        return ("vggish",) if cfg.get("timestamps_form") == "reference" else ("vggish", "timestamps_ms")

    auto_batch_size = {"cpu": 64, "cuda": 256}
    frame_seam = True

    @classmethod
    def weights_for(cls, cfg: Any) -> dict:
        out = {"vggish": (VGGISH_CARD, cfg.checkpoint_path)}
        if cfg.postprocess:
            out["pca"] = (PCA_CARD, cfg.pca_path)
        return out

    @classmethod
    def validate(cls, cfg: Any) -> None:
        try:
            hop_frames(cfg.get("hop_s", EXAMPLE_SECONDS))
        except (TypeError, ValueError):
            raise ConfigError(f"option hop_s must be a positive multiple of 0.01 s, got "
                              f"{cfg.get('hop_s')!r}") from None
        if getattr(cfg, "show_pred", False):
            raise ConfigError("show_pred is not available for vggish: the network has no "
                              "classifier head (set show_pred=false)")
        ckpt = getattr(cfg, "checkpoint_path", None)
        if ckpt:
            prefix = tf_checkpoint_prefix(ckpt) if not str(ckpt).endswith(".pth") else None
            exists = (Path(prefix).is_file() or Path(prefix + ".index").is_file()) if prefix \
                else Path(ckpt).expanduser().is_file()
            if not exists:
                raise ConfigError(f"checkpoint_path {ckpt!r} does not exist")
        pca = getattr(cfg, "pca_path", None)
        if pca:
            if not Path(pca).expanduser().is_file():
                raise ConfigError(f"pca_path {pca!r} does not exist")
            if not getattr(cfg, "postprocess", False):
                log.warning("pca_path is set but postprocess=false: the PCA is not applied")

    def __init__(self, cfg: Any, device: torch.device | str) -> None:
        super().__init__(cfg, device)
        self.output_keys = self.output_keys_for(cfg)
        self.hop = hop_frames(cfg.get("hop_s", EXAMPLE_SECONDS))  # in log-mel frames
        self.postprocess = bool(getattr(cfg, "postprocess", False))
        self.keep_priming = bool(getattr(cfg, "keep_priming", False))
        model, self.weights_source = build_vggish(cfg)
        log.info("vggish weights: %s", self.weights_source)
        self.model = model.to(self.device).eval()
        mel_dtype = torch.float64 if self.device.type in ("cpu", "cuda") else torch.float32
        self.frontend = LogMelExamples(dtype=mel_dtype).to(self.device)
        self.pca: PCAQuantizer | None = None
        if self.postprocess:
            self.pca = PCAQuantizer(*load_pca(cfg)).to(self.device).eval()

    def frame_needs(self) -> dict:
        return {"video": False, "audio": {"sample_rate": SAMPLE_RATE, "keep_priming": self.keep_priming}}

    def begin(self, work) -> None:
        work.state = _Audio(torch.zeros(0, dtype=torch.float32, device=self.device))

    def add_audio(self, work, samples: np.ndarray) -> list:
        """Samples -> the log-mel examples they complete (on the device); the samples an
        unfinished example still needs stay in ``work.state``."""
        st = work.state
        x = torch.from_numpy(samples)
        x = x.to(self.device) if self.device.type != "cpu" else x.clone()  # the buffer is reused
        st.samples += len(samples)
        pending = torch.cat([st.pending, x]) if len(st.pending) else x
        n = num_examples(len(pending), self.hop)
        if n == 0:
            st.pending = pending
            return []
        examples = self.frontend(pending[:samples_for(n, self.hop)], self.hop)
        st.pending = pending[n * self.hop * HOP:].clone()
        # row i starts at i hops and lasts one example
        starts = (st.examples + np.arange(n)) * (self.hop * HOP / SAMPLE_RATE * 1000.0)
        stamps = np.stack([starts, starts + EXAMPLE_SECONDS * 1000.0], 1)
        st.examples += n
        self.count_frames(n)
        return [("vggish", examples, stamps)]

    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        emb = self.model(batch, pre_activation=self.postprocess)
        return self.pca(emb) if self.pca is not None else emb

    def finish(self, work) -> dict[str, np.ndarray]:
        feats, stamps = rows_of(work, "vggish")
        if feats is None:
            raise VideoError(f"audio shorter than one 0.96 s example ({work.state.samples / SAMPLE_RATE:.3f} s "
                             f"decoded; VGGish needs at least {EXAMPLE_SPAN / SAMPLE_RATE:.3f} s)")
        out = {"vggish": feats.cpu().numpy()}
        if "timestamps_ms" in self.output_keys:
            out["timestamps_ms"] = stamps
        return out


@dataclasses.dataclass
class _Audio:
    """Per-input state: samples not yet in a complete example, and counts so far."""

    pending: torch.Tensor
    samples: int = 0
    examples: int = 0
