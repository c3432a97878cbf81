"""``feature_type=vggish``: the audio track -> ``Ta x 128`` VGGish embeddings, one row per 0.96 s.

Per input: :func:`utils.audio.iter_audio` decodes and resamples to 16 kHz mono on the CPU, block
by block; complete 0.96 s examples go to the device a batch at a time, where the log-mel front
end (:mod:`models.vggish.mel`) and the network run. Kernel launches are asynchronous, so the
device works on one batch while the CPU decodes the next; only the finished ``Ta x 128`` array
comes back. Memory holds the embeddings and less than one batch of audio.

Output ``vggish``:

* ``postprocess: false`` (default) - float32 ``(Ta, 128)``, the embedding after the network's final
  ReLU, as the reference tool (and the PyTorch port) emit it;
* ``postprocess: true`` - uint8 ``(Ta, 128)`` in AudioSet's released form: the official
  post-processing (PCA with whitening, clip to [-2, 2], 8-bit quantisation) applied, as Google's
  TensorFlow code does, to the pre-activation embedding (before that ReLU).

Row ``i`` covers audio ``[0.96 i, 0.96 i + 0.975)`` s; audio after the last complete example is
not used. Audio shorter than 0.975 s (one example with its STFT window) is an error for the
input, not an empty array.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from models.base import Extractor
from models.vggish.mel import (EXAMPLE_HOP, EXAMPLE_SPAN, SAMPLE_RATE, LogMelExamples,
                               num_examples, samples_for)
from models.vggish.net import PCAQuantizer
from models.vggish.weights import PCA_CARD, VGGISH_CARD, build_vggish, load_pca, tf_checkpoint_prefix
from utils.audio import AudioInfo, iter_audio, pcm_source_description
from utils.config import SharedOptions, option
from utils.errors import ConfigError, VideoError

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
    keep_priming: bool = option(
        "keep the audio encoder's priming samples at the start (the reference tool's behaviour: "
        "its features are shifted by ~21-23 ms for AAC); default drops them like every player",
        changes_values=True)


class VGGishExtractor(Extractor):
    output_keys = ("vggish",)
    schema = VGGishOptions

    @classmethod
    def weights_for(cls, cfg: Any) -> dict:
        out = {"vggish": (VGGISH_CARD, cfg.checkpoint_path)}
        if cfg.postprocess:
            out["pca"] = (PCA_CARD, cfg.pca_path)
        return out

    @classmethod
    def validate(cls, cfg: Any) -> None:
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
        self.batch_size = int(getattr(cfg, "batch_size", 64) or 64)
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

    @torch.no_grad()
    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """16 kHz mono waveform (any length) -> ``(E, 128)`` on the device, no host sync."""
        examples = self.frontend(waveform.to(self.device))
        if examples.shape[0] == 0:
            dtype = torch.uint8 if self.postprocess else torch.float32
            return torch.zeros((0, 128), dtype=dtype, device=self.device)
        emb = self.model(examples, pre_activation=self.postprocess)
        if self.pca is not None:
            emb = self.pca(emb)
        return emb

    def _run(self, pending: np.ndarray, n: int, outs: list[torch.Tensor]) -> np.ndarray:
        wav = torch.from_numpy(pending[:samples_for(n)])
        if self.device.type == "cuda":
            wav = wav.pin_memory().to(self.device, non_blocking=True)
        outs.append(self.embed(wav))
        self.count_frames(n)
        return pending[n * EXAMPLE_HOP:]

    def extract(self, path: str) -> dict[str, np.ndarray]:
        info = AudioInfo()
        outs: list[torch.Tensor] = []
        pending = np.zeros(0, np.float32)
        total = 0
        for block in iter_audio(path, SAMPLE_RATE, keep_priming=self.keep_priming,
                                dtype=np.float32, info=info):
            total += len(block)
            pending = np.concatenate([pending, block]) if len(pending) else block
            while num_examples(len(pending)) >= self.batch_size:
                pending = self._run(pending, self.batch_size, outs)
        n = num_examples(len(pending))
        if n:
            pending = self._run(pending, n, outs)
        if not outs:
            raise VideoError(f"audio shorter than one 0.96 s example ({total / SAMPLE_RATE:.3f} s "
                             f"decoded; VGGish needs at least {EXAMPLE_SPAN / SAMPLE_RATE:.3f} s)")
        log.debug("%s: %s -> %d examples", path, pcm_source_description(info),
                  sum(o.shape[0] for o in outs))
        feats = torch.cat(outs)
        if feats.is_floating_point():  # bf16 / fp16 under precision autocast
            feats = feats.float()
        feats = feats.cpu().numpy()
        return {"vggish": feats}
