"""Optical flow as the output: ``feature_type=raft`` / ``pwc`` / ``tvl1`` save the flow field
itself.

For frames ``0..N-1`` (at the chosen rate) the output holds the flow from frame ``i`` to
``i + 1``: ``N-1 x 2 x H x W`` (x then y, in pixels of the frames the network saw), with
``timestamps_ms`` per pair (start of frame ``i``, end of frame ``i + 1``), or with
``timestamps_form=reference`` the ``N`` frame timestamps, as the reference tool saves them. Frames are used at their own size, or
resized (PIL's antialiased bilinear) so that the shorter side, or with
``resize_to_smaller_edge=false`` the longer one, is ``side_size``.

A flow field is large (0.9 MB a pair at 640x360 in float16), so rows never pile up on the
device: each batch's rows go straight to an unlinked spill file on the output disk, and the saved
array is written from a memory map of it; memory stays bounded by the batch whatever the
video's length. ``flow_format=jpg`` writes instead the 8-bit x/y JPEG pairs that TV-L1-style
pipelines and pytorch-i3d's training code read: ``<stem>/<stem>-000001x.jpg`` and ``...y.jpg``
(1-based), levels ``round(128 + 255 / (2 * flow_bound) * f)`` clamped to 0..255. They are
quantised on the device, encoded and written by two threads of their own (so neither the device
loop nor the GPU waits for the encoder) into a temporary folder that is renamed into place when
the input is finished; an input that fails takes its folder with it, and one a killed run left
is removed by the next run that meets it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from video_features.models import flow_weights
from video_features.models.base import Extractor
from video_features.models.tvl1.options import TVL1Options, check_tvl1_options
from video_features.utils.config import Config, SharedOptions, option
from video_features.utils.device import to_host_async
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.output import OutputWriter, remove_abandoned_temps, temp_name
from video_features.utils.transforms import resize

log = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}
FORMATS = ("npy", "jpg")
#: TV-L1's coarsest pyramid level has sides of at least 16 pixels; frames below have no pyramid
MIN_TVL1_SIDE = 16
JPEG_QUALITY = 95  # what OpenCV writes by default, as the TV-L1 extraction tools do
#: threads that encode and write JPEG batches (encode_jpeg runs without the GIL)
JPG_THREADS = 2
#: batches handed to those threads and not yet written, at most (bounds the host memory they hold)
JPG_BACKLOG = 4


def flow_size(h: int, w: int, side_size: int | None, smaller_edge: bool) -> tuple[int, int]:
    """The (h, w) flow is computed at, by the reference tool's rule: ``side_size`` for the
    shorter (or longer) side, the other truncated to int; a frame whose shorter side already is
    ``side_size`` is kept as it is, whichever edge is asked for (the reference does so too)."""
    if side_size is None or min(h, w) == side_size:
        return h, w
    if (w < h) == smaller_edge:
        return int(side_size * h / w), side_size
    return side_size, int(side_size * w / h)


def quantise(flow: torch.Tensor, bound: float) -> torch.Tensor:
    """Flow in pixels -> 8-bit levels: ``[-bound, bound]`` onto 0..255, 128 meaning still."""
    q = torch.round(128.0 + 255.0 / (2.0 * bound) * flow.clamp(-bound, bound))
    return q.clamp_(0, 255).to(torch.uint8)


@dataclasses.dataclass
class FlowOptions(SharedOptions):
    side_size: Optional[int] = option(
        "resize frames so that one side has this many pixels before computing flow (null: "
        "their own size)", at_least=8, changes_values=True)
    resize_to_smaller_edge: bool = option(
        "side_size applies to the shorter side (true) or the longer one (false)",
        changes_values=True)
    flow_format: str = option(
        "npy: one N-1 x 2 x H x W array; jpg: 8-bit x/y JPEG pairs per frame pair in "
        "<stem>/ (TV-L1 / pytorch-i3d layout)", choices=FORMATS, changes_values=True)
    flow_bound: float = option("flow_format=jpg: pixels mapped to the ends of the 8-bit range",
                               changes_values=True)


@dataclasses.dataclass
class RAFTFlowOptions(FlowOptions):
    finetuned_on: str = option("RAFT checkpoint: sintel or kitti", choices=("sintel", "kitti"),
                               changes_values=True)
    raft_iters: int = option("RAFT refinement iterations", at_least=1, changes_values=True)


@dataclasses.dataclass
class TVL1FlowOptions(FlowOptions, TVL1Options):
    pass


@dataclasses.dataclass
class _FlowVideo:
    """Per-video state: the last frame (pairs cross chunks), every frame's timestamp, and where
    the rows go."""

    prev: torch.Tensor | None = None
    stamps: list = dataclasses.field(default_factory=list)
    pairs: int = 0
    size: tuple[int, int] | None = None
    spill: Any = None           # flow_format=npy: unlinked file holding the rows so far
    queued: Any = None          # (host rows, ready) of the last batch, still being copied
    jpg_dir: Path | None = None  # flow_format=jpg: temporary folder of the JPEGs so far
    jpg_stem: str = ""
    jpg_jobs: list = dataclasses.field(default_factory=list)  # its batches' encode-and-write


class FlowExtractor(Extractor):
    """Shared by raft, pwc and tvl1; subclasses name the network (or solver)."""

    auto_batch_size = {"cpu": 4, "cuda": 16}
    frame_seam = True
    schema = FlowOptions

    @classmethod
    def output_keys_for(cls, cfg: Config) -> tuple[str, ...]:
        if cfg.flow_format == "jpg":  # the flow itself is in JPEG files beside these
            return ("fps", "timestamps_ms")
        return (cfg.feature_type, "fps", "timestamps_ms")

    @classmethod
    def validate(cls, cfg: Config) -> None:
        if cfg.flow_format == "jpg" and cfg.on_extraction != "save_numpy":
            raise ConfigError("option flow_format=jpg writes JPEG files: use "
                              "on_extraction=save_numpy (fps and timestamps go beside them)")
        if not cfg.flow_bound > 0:
            raise ConfigError(f"option flow_bound must be > 0, got {cfg.flow_bound!r}")

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.validate(cfg)
        super().__init__(cfg, device)
        self.output_keys = self.output_keys_for(cfg)
        self.net = self.load_net()
        #: frame pairs per batch: ``batch_size``, halved for the rest of the run whenever a batch
        #: runs out of GPU memory (so later batches do not run out again)
        self.pairs_per_batch = int(cfg.batch_size)
        self._jpg_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._jpg_backlog: collections.deque = collections.deque()

    # -- what each network needs --------------------------------------------------------------
    def load_net(self) -> torch.nn.Module:
        raise NotImplementedError

    def estimate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_size(self, h: int, w: int) -> None:
        """Raise VideoError for frames the network cannot take."""

    # -- frames -> pairs ----------------------------------------------------------------------
    def chunk_frames(self) -> int:
        return max(8, self.cfg.batch_size)

    def begin(self, work: Any) -> None:
        work.state = _FlowVideo()

    def add_frames(self, work: Any, frames: torch.Tensor, stamps: np.ndarray) -> list:
        st = work.state
        h, w = frames.shape[-2:]
        size = flow_size(h, w, self.cfg.side_size, self.cfg.resize_to_smaller_edge)
        if st.prev is None:
            self.check_size(*size)
        x = resize(frames, size, antialias=True)  # float [0, 255], whole levels as PIL's
        st.stamps.extend(np.asarray(stamps, np.float64).tolist())
        seq = x if st.prev is None else torch.cat([st.prev[None], x])
        st.prev = seq[-1].clone()  # frames is a reused buffer
        if len(seq) < 2:
            return []
        pairs = torch.stack([seq[:-1], seq[1:]], 1)  # (n, 2, 3, h, w)
        return [("flow", pairs, np.asarray(stamps, np.float64)[-len(pairs):])]

    def batch_size_of(self, key: str) -> int:
        return self.pairs_per_batch

    @torch.inference_mode()
    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3, h, w) frame pairs -> (B, 2, h, w) flow; a batch too big for the GPU is
        split in halves rather than failing, and later batches are made no bigger."""
        try:
            return self.estimate(batch[:, 0], batch[:, 1])
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(batch) // 2
            if self.pairs_per_batch > half:
                self.pairs_per_batch = half
                log.warning("optical flow ran out of GPU memory: %d frame pairs per batch from now "
                            "on", half)
            return torch.cat([self.forward(key, batch[:half]), self.forward(key, batch[half:])])

    # -- rows -> disk -------------------------------------------------------------------------
    def _spill_dir(self) -> str | None:
        if self.cfg.on_extraction == "print":
            return None
        path = Path(self.cfg.output_path or ".")
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _jpg_target(self, path: str) -> Path:
        writer = OutputWriter.from_config(self.cfg)
        return writer.video_dir(path) / writer.stem(path)

    def keep_rows(self, work: Any, key: str, rows: torch.Tensor, stamps: np.ndarray) -> None:
        st = work.state
        st.size = tuple(rows.shape[-2:])
        if self.cfg.show_pred:
            mag = rows.float().norm(dim=1).flatten(1)
            for i, (mean, top) in enumerate(zip(mag.mean(1).tolist(), mag.amax(1).tolist())):
                print(f"{work.path} flow #{st.pairs + i}: mean |flow| {mean:.3f} px, "
                      f"max {top:.3f} px", flush=True)
        if self.cfg.flow_format == "jpg":
            self._write_jpgs(work, st, rows)
        else:
            if st.spill is None:
                st.spill = tempfile.TemporaryFile(dir=self._spill_dir(), prefix=".flow-spill-")
            # one batch in flight: its copy off the device is written when the next one comes
            # (or at the end), so the device loop never waits for the GPU here
            queued = to_host_async(rows.to(torch.float16 if self.cfg.dtype == "float16"
                                           else torch.float32))
            self._write_queued(st)
            st.queued = queued
        st.pairs += len(rows)

    @staticmethod
    def _write_queued(st: _FlowVideo) -> None:
        if st.queued is not None:
            host, ready = st.queued
            ready()
            st.spill.write(host.numpy().tobytes())
            st.queued = None

    def _write_jpgs(self, work: Any, st: _FlowVideo, rows: torch.Tensor) -> None:
        if st.jpg_dir is None:
            target = self._jpg_target(work.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned_temps(target)   # the folder of a killed run's attempt
            st.jpg_dir = temp_name(target)
            st.jpg_dir.mkdir()
            st.jpg_stem = target.name
        levels, ready = to_host_async(quantise(rows.float(), self.cfg.flow_bound))
        if self._jpg_pool is None:
            self._jpg_pool = concurrent.futures.ThreadPoolExecutor(
                JPG_THREADS, thread_name_prefix="flow-jpg")
        while len(self._jpg_backlog) >= JPG_BACKLOG:
            concurrent.futures.wait([self._jpg_backlog.popleft()])
        job = self._jpg_pool.submit(_write_jpg_batch, levels, ready, st.jpg_dir, st.jpg_stem,
                                    st.pairs + 1)
        st.jpg_jobs.append(job)
        self._jpg_backlog.append(job)

    def discard(self, work: Any) -> None:
        st = work.state
        if not isinstance(st, _FlowVideo):
            return
        concurrent.futures.wait(st.jpg_jobs)   # none may write into the folder once it is gone
        st.jpg_jobs = []
        if st.jpg_dir is not None:
            shutil.rmtree(st.jpg_dir, ignore_errors=True)
            st.jpg_dir = None
        if st.spill is not None:
            st.spill.close()
            st.spill = None

    def finish(self, work: Any) -> dict[str, np.ndarray]:
        st = work.state
        if st.pairs == 0:
            raise VideoError(f"too short: optical flow needs at least 2 frames, the video has "
                             f"{len(st.stamps)}")
        frames = np.asarray(st.stamps, np.float64)
        if self.cfg.timestamps_form == "reference":
            times = frames  # one per frame (N), as the reference saves them
        else:  # pair i covers frames i and i + 1
            times = self.row_times(work, np.stack([frames[:-1], frames[1:]], 1))
        out = {"fps": np.array(work.fps, dtype=np.float64), "timestamps_ms": times}
        if self.cfg.flow_format == "jpg":
            for job in st.jpg_jobs:   # every JPEG on disk (a write error is raised here)
                job.result()
            st.jpg_jobs = []
            target = self._jpg_target(work.path)
            if target.exists():  # recomputed (overwrite, or an output made otherwise)
                shutil.rmtree(target)
            st.jpg_dir.rename(target)
            st.jpg_dir = None
            return out
        self._write_queued(st)
        st.spill.flush()
        shape = (st.pairs, 2, *st.size)
        # the map keeps the data after the (already unlinked) file is closed
        flow = np.memmap(st.spill, dtype=DTYPES[self.cfg.dtype], mode="r", shape=shape)
        st.spill.close()
        st.spill = None
        return {self.cfg.feature_type: flow, **out}


def _write_jpg_batch(levels: torch.Tensor, ready: Any, folder: Path, stem: str,
                     first: int) -> None:
    """(B, 2, h, w) uint8 levels of pairs ``first``, ``first + 1``, ... -> their x and y JPEGs
    in ``folder`` (on a JPEG thread, once the copy off the device is ``ready``)."""
    from torchvision.io import encode_jpeg

    ready()
    images = [levels[i, c:c + 1].contiguous() for i in range(len(levels)) for c in (0, 1)]
    for j, data in enumerate(encode_jpeg(images, quality=JPEG_QUALITY)):
        n, axis = first + j // 2, "xy"[j % 2]
        (folder / f"{stem}-{n:06d}{axis}.jpg").write_bytes(data.numpy().tobytes())


class RAFTFlowExtractor(FlowExtractor):
    schema = RAFTFlowOptions

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"raft": (flow_weights.raft_card(cfg.finetuned_on), cfg.checkpoint_path)}

    def load_net(self) -> torch.nn.Module:
        return flow_weights.load_raft(self.cfg.checkpoint_path, bool(self.cfg.allow_random_weights),
                                      self.device, finetuned_on=self.cfg.finetuned_on)

    def estimate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net.estimate(a, b, iters=self.cfg.raft_iters, unpad=True)

    def check_size(self, h: int, w: int) -> None:
        # its correlation pyramid halves a 1/8-scale volume three times
        if min(-(-h // 8), -(-w // 8)) < 8:
            raise VideoError(f"frames of {w}x{h} are too small for RAFT: it needs at least 57 "
                             f"pixels per side (set side_size)")


class PWCFlowExtractor(FlowExtractor):
    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {"pwc": (flow_weights.PWC_CARD, cfg.checkpoint_path)}

    def load_net(self) -> torch.nn.Module:
        return flow_weights.load_pwc(self.cfg.checkpoint_path, bool(self.cfg.allow_random_weights),
                                     self.device)

    def estimate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net.estimate(a, b)


class TVL1FlowExtractor(FlowExtractor):
    """Dual TV-L1 (:mod:`models.tvl1`): no weights; float32 whatever the ``precision``."""

    schema = TVL1FlowOptions
    # the solver's work is parallel over pairs (threads on the CPU, the GPU's width)
    auto_batch_size = {"cpu": 8, "cuda": 64}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        super().validate(cfg)
        check_tvl1_options(cfg)

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        return {}

    def load_net(self) -> torch.nn.Module:
        from video_features.models.tvl1 import TVL1, TVL1Params

        return TVL1(TVL1Params.from_config(self.cfg)).to(self.device)

    def estimate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net.estimate(a, b)

    def check_size(self, h: int, w: int) -> None:
        if min(h, w) < MIN_TVL1_SIDE:
            raise VideoError(f"frames of {w}x{h} are too small for TV-L1: it needs at least "
                             f"{MIN_TVL1_SIDE} pixels per side (set side_size)")
