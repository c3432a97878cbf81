"""The Extractor seam every feature type implements.

An extractor is built once per worker with ``(cfg, device)``; the runner then calls
:meth:`Extractor.extract` for one video at a time and writes whatever dict it returns. Bad input
is reported by raising :class:`utils.errors.VideoError` with a one-line reason.

Option validation happens in :meth:`Extractor.validate`, a classmethod the config layer calls
before any worker starts or any model is loaded.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from video_features.utils.config import Config, SharedOptions, option
from video_features.utils.errors import FeatureError, VideoError
from video_features.utils.transforms import CROPS, n_views
from video_features.utils.windows import TAILS
from video_features.utils.weights import WeightCard


@dataclasses.dataclass
class CropOptions(SharedOptions):
    """Options of every feature type that crops frames for an image or video network."""

    crops: str = option(
        "center: the feature type's centre crop (rows T x D); 5 / 10: torchvision's FiveCrop / "
        "TenCrop views (corners, centre; and of the flipped frame), run as a batch dimension "
        "and saved as T x crops x D", choices=tuple(CROPS), changes_values=True)


@dataclasses.dataclass
class StackOptions(CropOptions):
    """Options of the clip models (i3d, r21d, s3d, tv_video, videomae)."""

    stack_size: int = option("frames per stack (clip); an i3d stack reads stack_size + 1 frames "
                             "(flow needs pairs)", at_least=1, changes_values=True)
    step_size: int = option("frames between the starts of consecutive stacks", at_least=1,
                            changes_values=True)
    tail: str = option("drop: ignore frames after the last full stack (reference behaviour); "
                       "pad: one more stack, completed by repeating its last frame",
                       choices=TAILS, changes_values=True)


class Extractor(abc.ABC):
    #: keys of the dict ``extract`` returns, in the order they are written; set per instance
    output_keys: tuple[str, ...] = ()
    #: ``batch_size: auto`` per device type: CPUs run convolutions fastest on small batches
    #: (cache locality), GPUs need large ones to be kept busy
    auto_batch_size: ClassVar[dict[str, int]] = {"cpu": 8, "cuda": 32}
    #: the typed schema of this feature type's options (utils/config.py)
    schema: ClassVar[type] = SharedOptions
    #: bumped whenever this feature type's numbers change for the same options and weights,
    #: so that outputs of an older revision are recomputed rather than reused
    revision: ClassVar[int] = 1

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        #: crops per frame or stack (the ``crops`` option; 1 for types without it)
        self.views = n_views(cfg.get("crops"))
        #: frames decoded for the current video; the runner reads it for frames/s
        self.frames_read = 0
        #: called with each count as frames are read (the runner's live progress), or None
        self.progress_hook: Callable[[int], None] | None = None

    @classmethod
    def validate(cls, cfg: Config) -> Config | None:
        """Raise :class:`utils.errors.ConfigError` naming the option when ``cfg`` is invalid;
        may return ``cfg`` completed (null options resolved to the values they stand for)."""

    def extract(self, path: str) -> dict[str, np.ndarray]:
        """Features of one video (or frame folder / audio file) as numpy arrays.

        Feature types on the frame seam get this for free: the same seam methods as the
        pipeline (``begin``, ``add_frames`` / ``add_audio``, ``forward``, ``finish``), fed by an
        in-process decoder. Others override it.
        """
        if not self.frame_seam:
            raise NotImplementedError(f"{type(self).__name__} implements neither extract nor "
                                      "the frame seam")
        from video_features.utils.pipeline import Batcher, VideoWork

        needs = self.frame_needs()
        work = VideoWork(0, path)
        batcher = Batcher(self.run_batch, self.batch_size_of, self.keep_rows)

        def add(items: list) -> None:
            for key, rows_in, ts in items:
                batcher.add(work, key, rows_in, ts)
            batcher.run(full_only=True)

        with torch.inference_mode():
            self.begin(work)
            if needs.get("video", True):
                self._extract_video(work, needs, add)
            if needs.get("audio"):
                self._extract_audio(work, needs["audio"], add)
            batcher.run(full_only=False)
            return self.finish(work)

    def _extract_video(self, work: Any, needs: dict, add: Callable[[list], None]) -> None:
        from video_features.utils.video import open_frames

        try:
            with open_frames(work.path, needs["extraction_fps"], needs["frames_fps"],
                             timestamps=needs["timestamps"],
                             extraction_total=needs.get("extraction_total"),
                             rotation=needs.get("rotation", "auto"),
                             video_stream=self.cfg.get("video_stream")) as src:
                work.fps = src.fps
                self.video_opened(work)
                for chunk in src.chunks(self.chunk_frames()):
                    n = len(chunk.timestamps_ms)
                    work.frames += n
                    work.times_s = chunk.times_s
                    self.count_frames(n)
                    add(self.add_frames(work, self.to_device_frames(chunk.frames),
                                        chunk.timestamps_ms))
                add(self.end_frames(work, src.end_time()))
        except FeatureError as exc:
            self.stream_failed(work, "video", str(exc))

    def _extract_audio(self, work: Any, audio: dict, add: Callable[[list], None]) -> None:
        from video_features.utils.audio import iter_audio

        try:
            for block in iter_audio(work.path, audio["sample_rate"],
                                    keep_priming=audio.get("keep_priming", False), dtype=np.float32,
                                    stream=self.cfg.get("audio_stream")):
                add(self.add_audio(work, block))
            add(self.end_audio(work))
        except FeatureError as exc:
            self.stream_failed(work, "audio", str(exc))

    # -- the frame seam (utils/pipeline.py) ---------------------------------------------------
    #: True when the feature type implements the methods below; it then runs in the pipeline:
    #: decoding in other processes, its work items batched across videos
    frame_seam: ClassVar[bool] = False

    def frame_needs(self) -> dict:
        """What to decode: ``video`` (bool) with its rate (extraction_fps) or its number of
        evenly spaced frames (extraction_total), frame-folder rate and timestamp mode;
        ``audio``: None, or ``{"sample_rate", "keep_priming"}`` for mono float32 samples."""
        return {"video": True, "extraction_fps": self.cfg.extraction_fps,
                "extraction_total": self.cfg.get("extraction_total"),
                "frames_fps": self.cfg.frames_fps, "timestamps": self.cfg.timestamps,
                "audio": None}

    def chunk_frames(self) -> int:
        """Frames per decoded chunk (the unit of transfer and of ``add_frames``)."""
        return 32

    def to_device_frames(self, frames: np.ndarray, pinned: bool = False) -> torch.Tensor:
        """(n, H, W, 3) uint8 host frames -> (n, 3, H, W) uint8 on the device. On the CPU this is
        a view of the host buffer, which is reused once ``add_frames`` returns. ``pinned``: the
        host memory is page-locked already, so the copy to a GPU runs straight from it."""
        from video_features.utils.transforms import to_device

        return to_device(frames, self.device, pinned)

    def begin(self, work: Any) -> None:
        """Set up ``work.state`` for a new input, before anything of it is decoded."""

    def video_opened(self, work: Any) -> None:
        """The video stream is open: ``work.fps`` (of the frames to come) is known."""

    def add_frames(self, work: Any, frames: torch.Tensor, stamps: np.ndarray) -> list:
        """Frames of ``work`` -> work items ``[(network key, items (k, ...), timestamps (k,))]``.

        ``frames`` may be a view of a reused transfer buffer: keep nothing of it after returning
        (items must be new tensors; state that needs a frame later stores a copy)."""
        raise NotImplementedError

    def end_frames(self, work: Any, end_s: float | None = None) -> list:
        """Work items left when the video's frames are over (e.g. a padded tail stack);
        ``end_s``: where the input ends, seconds from its first frame (None: unknown)."""
        return []

    def add_audio(self, work: Any, samples: np.ndarray) -> list:
        """Mono float32 samples (the next part of the track) -> work items, as ``add_frames``
        (``samples`` may be a view of a reused buffer: copy what is kept)."""
        raise NotImplementedError

    def end_audio(self, work: Any) -> list:
        """Work items left when the audio track is over."""
        return []

    def stream_failed(self, work: Any, stream: str, reason: str) -> None:
        """The ``video`` or ``audio`` stream of ``work`` could not be decoded. By default the
        input fails with the reason; a feature type that can do without it returns."""
        raise VideoError(reason)

    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        """One batch of work items (possibly of several videos) -> one row per item."""
        raise NotImplementedError

    def autocast(self) -> Any:
        """The ``precision`` option as a context around the networks."""
        from video_features.utils.device import precision_context

        return precision_context(self.device, self.cfg.get("precision", "fp32"))

    def run_batch(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        """``forward`` at the configured precision; rows come back as fp32.

        With several crops an item holds its views on the axis before ``(C, H, W)``
        (:func:`utils.transforms.crop_views`): ``(B, V, C, H, W)`` frames or ``(B, T, V, C, H,
        W)`` stacks. They go through ``forward`` as ``B * V`` items, so the crops of a frame or
        stack share one pass, and come back as rows ``(B, V, ...)``."""
        with self.autocast():
            if self.views > 1:
                by_view = batch.movedim(batch.dim() - 4, 1)
                rows = self.forward(key, by_view.flatten(0, 1)).unflatten(0, by_view.shape[:2])
            else:
                rows = self.forward(key, batch)
        return rows.float() if rows.is_floating_point() else rows

    def over_views(self, predict: Callable[[torch.Tensor], torch.Tensor],
                   rows: torch.Tensor) -> torch.Tensor:
        """``predict`` (rows -> class probabilities) of every view, averaged over the crops of
        each row, as multi-crop testing scores a frame or stack (``show_pred``)."""
        if self.views == 1:
            return predict(rows)
        return predict(rows.flatten(0, 1)).unflatten(0, rows.shape[:2]).mean(1)

    def batch_size_of(self, key: str) -> int:
        """Items per batch of the network ``key`` (``batch_size``; a type with networks of other
        sizes, such as I3D's optical flow, says so here)."""
        return self.cfg.batch_size

    def keep_rows(self, work: Any, key: str, rows: Any, stamps: np.ndarray) -> list | None:
        """A block of rows of ``key`` for ``work``, back from a batch, in order. By default they
        are held until ``finish``; a type whose rows are large (optical flow fields) moves them
        off the device here, so memory does not grow with the video. A type whose network feeds
        another returns that network's work items (as ``add_frames`` does)."""
        from video_features.utils.pipeline import hold_rows

        hold_rows(work, key, rows, stamps)
        return None

    def finish(self, work: Any) -> dict[str, np.ndarray]:
        """The rows of one video (``utils.pipeline.rows_of(work, key)``, in order) -> outputs;
        raises VideoError when there are none (e.g. shorter than one stack)."""
        raise NotImplementedError

    def discard(self, work: Any) -> None:
        """``work`` failed and will not be finished: remove what its state keeps outside memory
        (a type that writes files as it goes). Memory is freed with the state itself."""

    @classmethod
    def weights_for(cls, cfg: Config) -> dict[str, tuple[WeightCard, str | None]]:
        """role -> (weight card, explicit checkpoint path or None) of every checkpoint ``cfg``
        loads; recorded beside the outputs so that other weights are never mistaken for these."""
        return {}

    @classmethod
    def output_keys_for(cls, cfg: Config) -> tuple[str, ...]:
        """Keys ``extract`` will return under ``cfg`` (used to find finished outputs up front)."""
        return tuple(cls.output_keys)

    def count_frames(self, n: int) -> None:
        self.frames_read += int(n)
        if self.progress_hook is not None:
            self.progress_hook(int(n))

    def row_times(self, work: Any, stamps: np.ndarray, lead_frames: int = 0) -> np.ndarray:
        """``timestamps_ms`` of the rows, in the form ``timestamps_form`` asks for.

        ``stamps``: per row the timestamp of its frame (frame-wise, 1-D) or of its first and
        last real frames (stacks, ``(T, 2)``, see :func:`utils.windows.stack_windows`).
        ``span`` gives ``(T, 2)``: from the first frame's time to the end of the last frame (its
        time plus one frame at the rate of the frames used), minus ``lead_frames`` frames at the
        start for rows that also read frames before their first stamp (i3d's stamps are those of
        the frame after each element). ``reference`` gives the one column the reference tool
        saves: the frame's time, or the stack's last real frame."""
        stamps = np.asarray(stamps, np.float64)
        first, last = (stamps, stamps) if stamps.ndim == 1 else (stamps[:, 0], stamps[:, 1])
        if self.cfg.get("timestamps_form", "span") == "reference":
            return last.copy()
        frame_ms = 1000.0 / work.fps if work.fps else 0.0
        return np.stack([first - lead_frames * frame_ms, last + frame_ms], 1)

    def print_predictions(self, title: str, probs: torch.Tensor, labels: list[str],
                          k: int = 5, first: int = 0) -> None:
        """``--show_pred``: top-k classes per row of ``probs`` (rows = frames or stacks)."""
        top_p, top_i = probs.float().cpu().topk(min(k, probs.shape[-1]), dim=-1)
        for row, (ps, ids) in enumerate(zip(top_p.tolist(), top_i.tolist())):
            preds = "  ".join(f"{labels[i] if i < len(labels) else i}: {p:.3f}"
                              for p, i in zip(ps, ids))
            print(f"{title} #{first + row}: {preds}", flush=True)
