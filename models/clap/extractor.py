"""``feature_type=clap``: the audio track -> LAION CLAP audio embeddings (transformers' ClapModel),
one ``(512,)`` row per window of ``window_s`` seconds, a window every ``hop_s``.

Decoder processes decode the track and resample it to the model's 48 kHz mono
(:func:`utils.audio.iter_audio`: int16 / 32768, channel mean, resampy ``kaiser_best``, as for
VGGish) and hand it over in shared memory. Here each complete window is cut out and padded to the
model's ``max_length_s`` (10 s) the way its ClapFeatureExtractor pads a shorter clip
(``repeatpad``); after the last complete window, the rest of the track makes one more window when
it holds at least ``min_window_s`` (default 1 s), padded the same way, and is dropped otherwise.
An input with less audio than that is an error ("too short").

Windows of several inputs are batched; the log-mel front end (:mod:`models.clap.frontend`, the
feature extractor's STFT, filter bank and dB in torch) and the audio tower run on the device.
A window is never longer than ``max_length_s``, so the extractor's random paths (``rand_trunc``'s
random crop, ``fusion``'s three random chunks) are never taken: its output for a window is
deterministic. Fused models get the mel four times over, as the extractor stacks it, and the
``is_longer`` flag of every window from ``fused_longer``: false (default) marks windows of at
most 10 s "not longer", the flag's meaning; true runs the fusion branch on each, which is what
ClapFeatureExtractor + ``get_audio_features`` give for one clip processed alone (for a batch
the extractor marks one random clip "longer", which would make a row depend on its batch).

Output ``clap``: float32 ``(Ta, 512)``, ``ClapModel.get_audio_features``' pooled output: the
projected audio embedding, L2-NORMALISED (transformers 4.x and 5.x both normalise it; LAION's
``get_audio_embedding`` too). ``timestamps_ms``: ``(Ta, 2)``, start and end of the audio each
row covers (a padded last window ends where the audio ends); none with
``timestamps_form=reference``, as for vggish. ``show_pred``: zero-shot top-5 of ``pred_texts``
(default: common sound classes as "the sound of {class}"), softmax of cosine similarity times
the model's ``exp(logit_scale_a)``, as ClapModel's ``logits_per_audio``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, List, Optional

import numpy as np
import torch

from video_features.models.base import Extractor
from video_features.models.clap.frontend import ClapLogMel
from video_features.models.clap.weights import (DEFAULT_MODEL, KNOWN_MODELS, MAX_LENGTH_S,
                                                SOUND_LABELS, build_audio_tower, build_config,
                                                build_text_tower, card_for, feature_extractor_for,
                                                import_transformers, read_state_dict, resolve,
                                                tokenizer_for, weights_file_for)
from video_features.utils.config import Config, SharedOptions, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.weights import use_random_weights

log = logging.getLogger(__name__)

#: the minimum last window where min_window_s is null (and window_s is longer)
MIN_WINDOW_S = 1.0


@dataclasses.dataclass
class CLAPOptions(SharedOptions):
    model_name: str = option(
        f"Hugging Face repo id ({DEFAULT_MODEL}, laion/clap-htsat-fused, "
        "laion/larger_clap_general, laion/larger_clap_music_and_speech, laion/larger_clap_music) "
        "or a local folder in transformers' layout (config.json, model.safetensors, "
        "preprocessor_config.json)", changes_values=True)
    revision: Optional[str] = option("hub revision (branch, tag or commit) of model_name; "
                                     "null: main", changes_values=True)
    window_s: float = option(
        "seconds of audio per row, at most the model's max_length_s (10); a shorter window is "
        "repeat-padded to 10 s as the model's feature extractor pads a short clip",
        above=0, changes_values=True)
    hop_s: Optional[float] = option("seconds between window starts; null: window_s (back to "
                                    "back)", above=0, changes_values=True)
    min_window_s: Optional[float] = option(
        "the audio after the last complete window makes one more (padded) window when it lasts "
        "at least this long, and is dropped otherwise; audio shorter than this is an error; "
        f"null: {MIN_WINDOW_S:g} s, or window_s if that is shorter", above=0, changes_values=True)
    fused_longer: bool = option(
        "fused models (laion/clap-htsat-fused): true marks every window is_longer, running the "
        "fusion branch as transformers does for one clip processed alone; false marks windows "
        "of at most 10 s not longer. Ignored by unfused models", changes_values=True)
    pred_texts: Optional[List[str]] = option(
        "show_pred: texts to rank for each window (zero-shot); null: common sound classes as "
        "'the sound of {class}'")


def window_rule(cfg: Config) -> tuple[float, float, float]:
    """(window_s, hop_s, min_window_s) with the nulls resolved."""
    window = float(cfg.window_s)
    hop = float(cfg.get("hop_s") or window)
    minimum = cfg.get("min_window_s")
    return window, hop, float(min(MIN_WINDOW_S, window) if minimum is None else minimum)


class CLAPExtractor(Extractor):
    schema = CLAPOptions
    auto_batch_size = {"cpu": 4, "cuda": 64}
    frame_seam = True

    @classmethod
    def output_keys_for(cls, cfg: Any) -> tuple[str, ...]:
        return ("clap",) if cfg.get("timestamps_form") == "reference" else ("clap", "timestamps_ms")

    @classmethod
    def validate(cls, cfg: Config) -> Config:
        if not cfg.model_name:
            raise ConfigError("option model_name is empty: give a Hugging Face repo id or a folder")
        window, hop, minimum = window_rule(cfg)
        if window > MAX_LENGTH_S and cfg.model_name in KNOWN_MODELS:
            raise ConfigError(f"option window_s={window:g}: {cfg.model_name} takes at most "
                              f"{MAX_LENGTH_S:g} s (its max_length_s)")
        if minimum > window:
            raise ConfigError(f"option min_window_s={minimum:g} is longer than window_s={window:g}")
        texts = cfg.get("pred_texts")
        if texts is not None and (not texts or not all(isinstance(t, str) and t.strip()
                                                       for t in texts)):
            raise ConfigError("option pred_texts: give one or more non-empty texts (or null)")
        if cfg.get("fused_longer") and KNOWN_MODELS.get(cfg.model_name) is False:
            raise ConfigError(f"option fused_longer: {cfg.model_name} is not a fused model")
        return cfg.replace(hop_s=hop, min_window_s=minimum)

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"clap": (card_for(cfg), weights_file_for(cfg))}

    def __init__(self, cfg: Config, device: torch.device) -> None:
        cfg = self.validate(cfg)
        super().__init__(cfg, device)
        import_transformers()
        self.output_keys = self.output_keys_for(cfg)
        random = use_random_weights(cfg.allow_random_weights, cfg.get("checkpoint_path"),
                                    f"clap {cfg.model_name}")
        src = resolve(cfg, random_weights=random, need_tokenizer=bool(cfg.show_pred))
        config = build_config(src)
        fe = feature_extractor_for(src, config)
        self.fused = bool(config.audio_config.enable_fusion)
        if (fe.truncation == "fusion") != self.fused:
            raise ConfigError(f"clap {src.model_id}: preprocessor_config.json has truncation="
                              f"{fe.truncation!r}, which does not fit enable_fusion={self.fused} "
                              "of config.json (fusion goes with fused models)")
        if cfg.fused_longer and not self.fused:
            raise ConfigError(f"option fused_longer: {src.model_id} is not a fused model")
        self.sample_rate = int(fe.sampling_rate)
        window_s, hop_s, min_s = window_rule(cfg)
        if window_s > fe.max_length_s:
            raise ConfigError(f"option window_s={window_s:g}: {src.model_id} takes at most "
                              f"{fe.max_length_s:g} s (its max_length_s)")
        self.window = int(round(window_s * self.sample_rate))
        self.hop = int(round(hop_s * self.sample_rate))
        self.min_window = max(1, int(round(min_s * self.sample_rate)))
        # float64 as the extractor's NumPy on CPUs and CUDA; devices without it get float32
        dtype = torch.float64 if self.device.type in ("cpu", "cuda") else torch.float32
        self.frontend = ClapLogMel.from_feature_extractor(fe, dtype).to(self.device)
        state = None if src.weights is None else read_state_dict(src.weights)
        self.audio = build_audio_tower(config, state).to(self.device)
        self.labels: list[str] = []
        if cfg.show_pred:
            self._prepare_texts(config, state, src)
        log.info("clap %s (%s): %g s windows every %g s, %d-d embeddings", src.model_id,
                 "fused" if self.fused else "unfused", window_s, hop_s, config.projection_dim)

    def _prepare_texts(self, config: Any, state: dict | None, src: Any) -> None:
        """Normalised embeddings of the texts show_pred ranks; the text tower is then freed."""
        if self.cfg.get("pred_texts"):
            self.labels = list(self.cfg.pred_texts)
            prompts = self.labels
        else:
            self.labels = [s for s in SOUND_LABELS.read_text().splitlines() if s.strip()]
            prompts = [f"the sound of {s}" for s in self.labels]
        tokenizer = tokenizer_for(src)
        text, self.logit_scale = build_text_tower(config, state)
        text = text.to(self.device)
        enc = tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            emb = text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds
        self.text_feats = torch.nn.functional.normalize(emb.double(), dim=-1)

    def frame_needs(self) -> dict:
        return {"video": False, "audio": {"sample_rate": self.sample_rate, "keep_priming": False}}

    def begin(self, work) -> None:
        work.state = _Track(torch.zeros(0, dtype=torch.float32, device=self.device))

    def add_audio(self, work, samples: np.ndarray) -> list:
        """Samples -> the windows they complete; the samples later windows need stay in
        ``work.state`` (less than one window, whatever the track's length)."""
        st = work.state
        x = torch.from_numpy(samples)
        x = x.to(self.device) if self.device.type != "cpu" else x.clone()  # the buffer is reused
        st.samples += len(x)
        st.pending = torch.cat([st.pending, x]) if len(st.pending) else x
        starts = []
        while st.next_start + self.window <= st.samples:
            starts.append(st.next_start)
            st.next_start += self.hop
        items = self._items(st, starts, self.window) if starts else []
        # keep from the next window's start on (beyond the track's end when hop_s > window_s)
        keep_from = min(st.next_start, st.samples)
        st.pending = st.pending[keep_from - st.pending_start:].clone()
        st.pending_start = keep_from
        return items

    def end_audio(self, work) -> list:
        st = work.state
        rest = st.samples - st.next_start
        if rest < self.min_window:
            return []
        return self._items(st, [st.next_start], rest)

    def _items(self, st: "_Track", starts: list[int], length: int) -> list:
        """Windows of ``length`` samples at absolute ``starts`` -> padded to max_length_s."""
        offsets = [s - st.pending_start for s in starts]
        windows = torch.stack([st.pending[o:o + length] for o in offsets])
        first = np.asarray(starts, np.float64)
        stamps = np.stack([first, first + length], 1) * (1000.0 / self.sample_rate)
        self.count_frames(len(starts))
        return [("clap", self.frontend.pad(windows), stamps)]

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        """(B, max samples) padded windows -> (B, D) L2-normalised embeddings, as
        ``ClapModel.get_audio_features`` computes them from the extractor's features."""
        with torch.autocast(self.device.type, enabled=False):  # the front end stays float64
            feats = self.frontend(batch)
        longer = torch.full((len(batch), 1), bool(self.fused and self.cfg.fused_longer),
                            dtype=torch.bool, device=batch.device)
        emb = self.audio(input_features=feats, is_longer=longer).audio_embeds
        return torch.nn.functional.normalize(emb, dim=-1)

    @torch.inference_mode()
    def finish(self, work) -> dict[str, np.ndarray]:
        feats, stamps = rows_of(work, "clap")
        if feats is None:
            st = work.state
            raise VideoError(f"too short: {st.samples / self.sample_rate:.3f} s of audio, less "
                             f"than min_window_s={self.min_window / self.sample_rate:g} s")
        if self.cfg.show_pred:
            sims = feats.to(self.text_feats.device, torch.float64) @ self.text_feats.T
            self.print_predictions(f"{work.path} window", torch.softmax(self.logit_scale * sims, -1),
                                   self.labels)
        out = {"clap": feats.float().cpu().numpy()}
        if "timestamps_ms" in self.output_keys:
            out["timestamps_ms"] = stamps
        return out


@dataclasses.dataclass
class _Track:
    """Per-input state: the samples from ``pending_start`` on, counts so far."""

    pending: torch.Tensor
    pending_start: int = 0      # absolute index of pending[0]
    samples: int = 0            # samples received
    next_start: int = 0         # absolute start of the next window


__all__ = ["CLAPExtractor", "CLAPOptions", "window_rule"]
