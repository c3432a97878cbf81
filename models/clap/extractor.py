"""``feature_type=clap``: the audio track -> CLAP audio embeddings, one per window.

The track is decoded at 48 kHz mono (the pipeline's decoder processes, resampled as for VGGish)
and cut into windows of ``window_s`` seconds every ``hop_s``; a last, shorter stretch of at least
``min_window_s`` makes one more window. Each window goes through the model's own front end, as
its ClapFeatureExtractor computes it but in torch on the device and batched: repeat-padding to
``max_length_s`` (10 s) when shorter, a 1024-point periodic Hann STFT with hop 480 (centred,
reflect padding), power, the extractor's 64-band mel bank (htk for fused models, slaney
otherwise), ``10 log10`` with a 1e-10 floor. Windows never exceed ``max_length_s``, so no random
crop or random fusion chunk is ever taken: every window is marked "not longer" (the
ClapFeatureExtractor itself marks one random sample of such a batch "longer" for fused models,
which would make a row depend on its batch).

Output ``clap``: ``(Ta, 512)`` float32, ``ClapModel.get_audio_features``: the projected audio
embedding, L2-normalised as transformers returns it. ``timestamps_ms``: ``(Ta, 2)`` start and
end of each window's audio.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from video_features.models.base import Extractor
from video_features.models.clap.weights import (DEFAULT_MODEL, SAMPLE_RATE, build, card_for, resolve,
                                 weights_file_for)
from video_features.utils.config import Config, SharedOptions, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.weights import use_random_weights

log = logging.getLogger(__name__)

#: show_pred's default prompts: common AudioSet classes as "the sound of {class}"
SOUND_CLASSES = (
    "speech", "a man speaking", "a woman speaking", "a child speaking", "conversation",
    "laughter", "crying", "singing", "music", "a guitar", "a piano", "drums", "a violin",
    "applause", "cheering", "footsteps", "a dog barking", "a cat meowing", "birds singing",
    "a rooster", "a car engine", "traffic", "a car horn", "a siren", "a train", "an airplane",
    "a helicopter", "a motorcycle", "rain", "wind", "thunder", "water flowing", "the sea",
    "fire crackling", "a door closing", "knocking", "a bell ringing", "a telephone ringing",
    "typing on a keyboard", "an explosion", "gunshots", "glass breaking", "silence",
)


@dataclasses.dataclass
class CLAPOptions(SharedOptions):
    model_name: str = option(
        "Hugging Face repo of a LAION CLAP model in transformers' layout (laion/clap-htsat-"
        "unfused, laion/clap-htsat-fused, laion/larger_clap_general, ...) or a local folder",
        changes_values=True)
    window_s: float = option("seconds of audio per embedding, at most the model's max_length_s "
                             "(10); shorter windows are repeat-padded as the model's front end "
                             "pads", changes_values=True)
    hop_s: Optional[float] = option("seconds between window starts (null: window_s, back to "
                                    "back)", changes_values=True)
    min_window_s: float = option("a last window shorter than window_s is kept when it holds at "
                                 "least this many seconds", changes_values=True)
    pred_texts: Optional[List[str]] = option(
        "show_pred: texts to rank for each window (zero-shot); null: common sound classes as "
        "'the sound of {class}'")


class CLAPExtractor(Extractor):
    output_keys = ("clap", "timestamps_ms")
    schema = CLAPOptions
    auto_batch_size = {"cpu": 4, "cuda": 64}
    frame_seam = True

    @classmethod
    def validate(cls, cfg: Config) -> None:
        window, hop = cfg.window_s, cfg.get("hop_s")
        if not (0 < window <= 10):
            raise ConfigError(f"option window_s must be in (0, 10] seconds, got {window!r}")
        if hop is not None and not hop > 0:
            raise ConfigError(f"option hop_s must be > 0 seconds, got {hop!r}")
        if not (0 < cfg.min_window_s <= window):
            raise ConfigError(f"option min_window_s must be in (0, window_s], got {cfg.min_window_s!r}")

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"clap": (card_for(cfg), weights_file_for(cfg))}

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.validate(cfg)
        super().__init__(cfg, device)
        random = use_random_weights(cfg.allow_random_weights, cfg.get("checkpoint_path"),
                                    f"clap {cfg.model_name}")
        src = resolve(cfg, random_weights=random)
        model, fe = build(src)
        self.model = model.to(self.device)
        self.fused = bool(model.config.audio_config.enable_fusion)
        if fe.sampling_rate != SAMPLE_RATE:
            raise ConfigError(f"clap {cfg.model_name}: its front end expects {fe.sampling_rate} Hz")
        self.max_samples = int(fe.max_length_s * SAMPLE_RATE)
        if cfg.window_s > fe.max_length_s:
            raise ConfigError(f"option window_s={cfg.window_s:g}: {cfg.model_name} takes at most "
                              f"{fe.max_length_s} s")
        bank = fe.mel_filters if self.fused else fe.mel_filters_slaney
        self.mel_bank = torch.from_numpy(np.asarray(bank, np.float64)).to(self.device)
        self.fft, self.hop_length = int(fe.fft_window_size), int(fe.hop_length)
        self.stft_window = torch.hann_window(self.fft, periodic=True, dtype=torch.float64,
                                             device=self.device)
        self.window = int(round(cfg.window_s * SAMPLE_RATE))
        self.hop = int(round((cfg.get("hop_s") or cfg.window_s) * SAMPLE_RATE))
        self.min_window = int(round(cfg.min_window_s * SAMPLE_RATE))
        self.text_emb = self.texts = None
        if cfg.show_pred:
            self.texts, self.text_emb = self._text_embeddings(src)

    def _text_embeddings(self, src: Any) -> tuple[list[str], torch.Tensor]:
        from transformers import AutoTokenizer

        texts = list(self.cfg.get("pred_texts") or [f"the sound of {c}" for c in SOUND_CLASSES])
        try:
            folder = src.folder
            if folder is None or not any((folder / f).is_file() for f in
                                         ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
                raise FileNotFoundError("no tokenizer files")
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"show_pred for clap needs the model's tokenizer files in "
                              f"{src.folder or src.model_id} ({type(exc).__name__})") from None
        enc = tok(texts, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            emb = self.model.get_text_features(**enc)
        emb = getattr(emb, "pooler_output", emb)
        return texts, F.normalize(emb, dim=-1)

    def frame_needs(self) -> dict:
        return {"video": False, "audio": {"sample_rate": SAMPLE_RATE, "keep_priming": False}}

    def begin(self, work: Any) -> None:
        work.state = _Track(torch.zeros(0, dtype=torch.float32, device=self.device))

    # -- audio -> windows -> log-mel inputs ----------------------------------------------------
    def log_mel(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, samples) windows -> (B, 1 or 4, frames, 64) model inputs."""
        x = windows.to(torch.float64)
        n = x.shape[1]
        if n < self.max_samples:  # repeatpad: whole repeats, then zeros up to max_length
            x = x.repeat(1, self.max_samples // n)
            x = F.pad(x, (0, self.max_samples - x.shape[1]))
        x = F.pad(x[:, None], (self.fft // 2, self.fft // 2), mode="reflect")[:, 0]
        frames = x.unfold(-1, self.fft, self.hop_length)
        power = torch.fft.rfft(frames * self.stft_window).abs().pow(2)
        mel = 10.0 * torch.log10((power @ self.mel_bank).clamp_min(1e-10))
        mel = mel.to(torch.float32)[:, None]
        return mel.expand(-1, 4, -1, -1).contiguous() if self.fused else mel

    def _windows(self, st: "_Track", last: bool) -> list:
        p = st.pending
        n = 0 if len(p) < self.window else (len(p) - self.window) // self.hop + 1
        items = []
        if n:
            wins = p[:(n - 1) * self.hop + self.window].unfold(0, self.window, self.hop)
            starts = (st.windows + np.arange(n)) * self.hop
            items.append(("clap", self.log_mel(wins),
                          np.stack([starts, starts + self.window], 1) * 1000.0 / SAMPLE_RATE))
            st.windows += n
            st.skip = max(0, n * self.hop - len(p))  # hop > window: samples no window reads
            st.pending = p = p[n * self.hop:].clone()
        if last and self.min_window <= len(p) < self.window and (
                st.windows == 0 or len(p) > self.window - self.hop):  # not all inside the last
            start = st.windows * self.hop
            items.append(("clap", self.log_mel(p[None]),
                          np.array([[start, start + len(p)]]) * 1000.0 / SAMPLE_RATE))
            st.windows += 1
        self.count_frames(sum(len(i[2]) for i in items))
        return items

    def add_audio(self, work: Any, samples: np.ndarray) -> list:
        st = work.state
        x = torch.from_numpy(samples)
        x = x.to(self.device) if self.device.type != "cpu" else x.clone()  # the buffer is reused
        st.samples += len(samples)
        if st.skip:
            k = min(st.skip, len(x))
            x, st.skip = x[k:], st.skip - k
        st.pending = torch.cat([st.pending, x]) if len(st.pending) else x
        return self._windows(st, last=False)

    def end_audio(self, work: Any) -> list:
        return self._windows(work.state, last=True)

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        longer = torch.zeros((len(batch), 1), dtype=torch.bool, device=batch.device)
        out = self.model.get_audio_features(input_features=batch, is_longer=longer)
        return getattr(out, "pooler_output", out)

    def finish(self, work: Any) -> dict[str, np.ndarray]:
        feats, stamps = rows_of(work, "clap")
        if feats is None:
            raise VideoError(f"too short: {work.state.samples / SAMPLE_RATE:.3f} s of audio, a "
                             f"window needs at least min_window_s={self.cfg.min_window_s:g} s")
        if self.text_emb is not None:
            sims = feats.float() @ self.text_emb.T
            self.print_predictions(f"{work.path} window", torch.softmax(sims * 100.0, -1), self.texts)
        return {"clap": feats.float().cpu().numpy(), "timestamps_ms": stamps}


@dataclasses.dataclass
class _Track:
    pending: torch.Tensor
    samples: int = 0
    windows: int = 0
    skip: int = 0
