"""Several feature types from one decode: ``--feature_type resnet i3d vggish``.

:class:`MultiExtractor` is one extractor on the frame seam holding one extractor per feature
type. The decoder processes decode each input once (frames, and the audio track where a type
needs it); each chunk is handed to every type, whose work items go into the shared batcher under
``<type>/<key>``, so the batches of each network still mix inputs. When the types ask for
different ``extraction_fps``, frames are decoded at the native rate and each type's are picked on
the device by :class:`utils.video.SlotSelector`, the rule the decoder itself applies, so every
type sees exactly the frames (and timestamps) of a single-type run.

A type whose outputs for an input are already done (same record) is not computed again; a type
that fails on an input (too short, no audio track) fails alone: the others are written and the
input is reported as failed with that type's reason. Outputs land where single-type runs put
them (``<output_path>/<feature_type>/...``), each with its own record.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np
import torch

from video_features.models.base import Extractor
from video_features.utils.config import Config
from video_features.utils.errors import ConfigError, FeatureError, VideoError
from video_features.utils.pipeline import VideoWork
from video_features.utils.transforms import pick_frames
from video_features.utils.video import SlotSelector

log = logging.getLogger(__name__)

SEP = "/"


@dataclasses.dataclass
class _Part:
    """One feature type's share of an input."""

    work: VideoWork
    selector: SlotSelector | None = None   # picks this type's frames from native-rate chunks
    held: torch.Tensor | None = None       # the selector's held frame (from the last chunk)
    error: str | None = None


class MultiExtractor(Extractor):
    frame_seam = True

    def __init__(self, cfgs: list[Config], device: Any, writers: Mapping[str, Any] | None = None,
                 build: Any = None) -> None:
        super().__init__(cfgs[0], device)
        if build is None:
            from video_features.utils.runner import build_extractor as build
        self.subs: dict[str, Extractor] = {c.feature_type: build(c, str(device)) for c in cfgs}
        self.writers = dict(writers or {})
        self.cfgs = {c.feature_type: c for c in cfgs}
        not_seam = [t for t, ex in self.subs.items() if not ex.frame_seam]
        if not_seam:
            raise ConfigError(f"feature type(s) {', '.join(not_seam)} cannot share a decode with "
                              "others: run them on their own")
        self.needs = {t: ex.frame_needs() for t, ex in self.subs.items()}
        self._decode = _common_needs(self.needs)

    # -- what to decode ------------------------------------------------------------------------
    def frame_needs(self) -> dict:
        return self._decode

    def chunk_frames(self) -> int:
        return max(ex.chunk_frames() for t, ex in self.subs.items() if self.needs[t]["video"]) \
            if self._decode["video"] else 32

    def _selects(self, t: str) -> bool:
        """Whether type ``t``'s frames are picked from native-rate chunks here."""
        return (self.needs[t]["video"] and self._decode["extraction_fps"] is None
                and self.needs[t]["extraction_fps"] is not None)

    # -- per input -----------------------------------------------------------------------------
    def begin(self, work: VideoWork) -> None:
        parts = {}
        for t, ex in self.subs.items():
            if self._done(t, work.path):
                continue
            part = _Part(VideoWork(work.vid, work.path))
            if self._selects(t):
                part.selector = SlotSelector(self.needs[t]["extraction_fps"])
            ex.begin(part.work)
            parts[t] = part
        work.state = parts

    def _done(self, t: str, path: str) -> bool:
        """Outputs of ``t`` for ``path`` that this run may reuse (another type was missing)."""
        writer = self.writers.get(t)
        if writer is None or not writer.saves or self.cfgs[t].overwrite:
            return False
        keys = type(self.subs[t]).output_keys_for(self.cfgs[t])
        return writer.state(path, keys).status == "done"

    def _live(self, work: VideoWork, stream: str) -> list[tuple[str, _Part]]:
        return [(t, p) for t, p in work.state.items()
                if p.error is None and self.needs[t][stream if stream == "video" else "audio"]]

    def _guarded(self, t: str, part: _Part, fn: Any, *args: Any) -> list:
        """A type's seam call; its failure is that type's only, and its items are namespaced."""
        try:
            items = fn(*args)
        except FeatureError as exc:
            part.error = str(exc)
            return []
        return [(f"{t}{SEP}{key}", rows_in, ts) for key, rows_in, ts in items]

    def video_opened(self, work: VideoWork) -> None:
        for t, part in self._live(work, "video"):
            part.work.fps = self.needs[t]["extraction_fps"] if part.selector else work.fps
            self._guarded(t, part, lambda: self.subs[t].video_opened(part.work) or [])

    def add_frames(self, work: VideoWork, frames: torch.Tensor, stamps: np.ndarray) -> list:
        out = []
        for t, part in self._live(work, "video"):
            mine, ts = frames, stamps
            if part.selector is not None:
                picks, slots = part.selector.push(work.times_s)
                mine, ts = self._pick(part, frames, picks, slots)
                part.held = frames[-1].clone()  # frames is a reused buffer
            if len(ts) == 0:
                continue
            part.work.frames += len(ts)
            out += self._guarded(t, part, self.subs[t].add_frames, part.work, mine, ts)
        return out

    @staticmethod
    def _pick(part: _Part, frames: torch.Tensor, picks: np.ndarray,
              slots: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        return pick_frames(part.held, frames, picks), slots / part.selector.fps * 1000.0

    def end_frames(self, work: VideoWork, end_s: float | None = None) -> list:
        out = []
        for t, part in self._live(work, "video"):
            if part.selector is not None and part.held is not None:
                picks, slots = part.selector.finish(end_s)
                mine, ts = self._pick(part, part.held[None][:0], picks, slots)
                if len(ts):
                    part.work.frames += len(ts)
                    out += self._guarded(t, part, self.subs[t].add_frames, part.work, mine, ts)
            if part.error is None:
                out += self._guarded(t, part, self.subs[t].end_frames, part.work, end_s)
            part.held = None
        return out

    def add_audio(self, work: VideoWork, samples: np.ndarray) -> list:
        out = []
        for t, part in self._live(work, "audio"):
            out += self._guarded(t, part, self.subs[t].add_audio, part.work, samples)
        return out

    def end_audio(self, work: VideoWork) -> list:
        out = []
        for t, part in self._live(work, "audio"):
            out += self._guarded(t, part, self.subs[t].end_audio, part.work)
        return out

    def stream_failed(self, work: VideoWork, stream: str, reason: str) -> None:
        for t, part in self._live(work, stream):
            try:
                self.subs[t].stream_failed(part.work, stream, reason)
            except FeatureError as exc:
                part.error = str(exc)
        if work.state and all(p.error is not None for p in work.state.values()):
            raise VideoError(_joined(work.state))

    # -- batches -------------------------------------------------------------------------------
    def run_batch(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        t, _, sub_key = key.partition(SEP)
        return self.subs[t].run_batch(sub_key, batch)  # each type at its own precision

    def batch_size_of(self, key: str) -> int:
        t, _, sub_key = key.partition(SEP)
        return self.subs[t].batch_size_of(sub_key) if t in self.subs else self.cfg.batch_size

    def keep_rows(self, work: VideoWork, key: str, rows: torch.Tensor, stamps: np.ndarray) -> list:
        t, _, sub_key = key.partition(SEP)
        part = work.state.get(t) if work.state else None
        if part is None or part.error is not None:
            return []
        return self._guarded(t, part, lambda: self.subs[t].keep_rows(part.work, sub_key, rows,
                                                                     stamps) or [])

    def finish(self, work: VideoWork) -> dict[str, dict[str, np.ndarray]]:
        """``{feature type: outputs}`` of the types that succeeded; the others' reasons go to
        ``work.partial_errors``. Raises when every type failed."""
        feats = {}
        for t, part in work.state.items():
            if part.error is not None:
                continue
            part.work.fps = part.work.fps if part.work.fps is not None else work.fps
            try:
                feats[t] = self.subs[t].finish(part.work)
            except FeatureError as exc:
                part.error = str(exc)
        failed = {t: p for t, p in work.state.items() if p.error is not None}
        for t, part in failed.items():
            self._discard_part(t, part)
        if failed and not feats:
            raise VideoError(_joined(failed))
        work.partial_errors = [f"{t}: {p.error}" for t, p in failed.items()]
        return feats

    def discard(self, work: VideoWork) -> None:
        for t, part in (work.state or {}).items():
            self._discard_part(t, part)

    def _discard_part(self, t: str, part: _Part) -> None:
        try:
            self.subs[t].discard(part.work)
        except Exception as exc:  # noqa: BLE001 - the part's failure is already its result
            log.warning("%s (%s): cleaning up after the failure: %s", part.work.path, t, exc)


def _joined(parts: Mapping[str, _Part]) -> str:
    return "; ".join(f"{t}: {p.error}" for t, p in parts.items() if p.error is not None)


def _common_needs(needs: Mapping[str, dict]) -> dict:
    """One decode for every type: the video at the common rate (native when the types' rates
    differ), the audio where some type needs it. Raises ConfigError where no single decode
    can serve them all."""
    video = {t: n for t, n in needs.items() if n["video"]}
    audio = {t: n["audio"] for t, n in needs.items() if n.get("audio")}
    out: dict = {"video": bool(video), "audio": None, "extraction_fps": None,
                 "frames_fps": 25.0, "timestamps": "pts"}
    if video:
        for key in ("frames_fps", "timestamps"):
            values = {n[key] for n in video.values()}
            if len(values) > 1:
                raise ConfigError(f"option {key} must be the same for every feature type of one "
                                  f"run (got {', '.join(f'{t}: {n[key]}' for t, n in video.items())})")
        one = next(iter(video.values()))
        rates = {n["extraction_fps"] for n in video.values()}
        totals = {n.get("extraction_total") for n in video.values()}
        if len(totals) > 1:
            # each type would need its own per-video rate: not one decode
            raise ConfigError("extraction_total must be the same for every feature type of one "
                              "run that reads frames (got " + ", ".join(
                                  f"{t}: {n.get('extraction_total')}" for t, n in video.items()) + ")")
        out["extraction_total"] = totals.pop()
        out["frames_fps"], out["timestamps"] = one["frames_fps"], one["timestamps"]
        # one rate: the decoder selects; several: native rate, each type picks its own frames
        out["extraction_fps"] = rates.pop() if len(rates) == 1 else None
    if audio:
        kinds = {tuple(sorted(a.items())) for a in audio.values()}
        if len(kinds) > 1:
            raise ConfigError("the audio feature types of one run must decode audio the same way "
                              "(sample rate, keep_priming)")
        out["audio"] = next(iter(audio.values()))
    return out


class MultiWriter:
    """One :class:`video_features.utils.output.OutputWriter` per feature type; ``write`` takes
    ``{feature type: outputs}``."""

    def __init__(self, writers: Mapping[str, Any]):
        self.writers = dict(writers)

    @property
    def saves(self) -> bool:
        return any(w.saves for w in self.writers.values())

    def write(self, video_path: str, feats: Mapping[str, Mapping[str, np.ndarray]],
              info: Mapping[str, Any] | None = None) -> list:
        written = []
        for t, f in feats.items():
            written += self.writers[t].write(video_path, f, info) or []
        return written
