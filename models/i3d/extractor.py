"""I3D two-stream features: RGB and optical-flow stacks -> 1024-d vectors (or feature maps).

Data flow for one video, all on the device after decoding:

    chunk of frames -> resize (short side 256, PIL-like) -> flow between consecutive frames
    (PWC-Net or RAFT, ``flow_batch_size`` pairs at a time) -> centre crop 224 -> RGB to
    [-1, 1], flow clamped/quantised to [-1, 1] -> sliding windows per stream -> stacks, batched
    with those of other videos (utils/pipeline.py) -> I3D per stream.

An element of the stream is frame ``i`` together with the flow from frame ``i`` to ``i + 1``,
so a stack of ``stack_size`` elements covers ``stack_size + 1`` frames, as in the reference
tool. Overlapping stacks (``step_size < stack_size``) share elements, so no frame is resized and
no flow is computed twice; with ``step_size > stack_size`` the flow of frames no stack uses is
never computed. A stack's timestamp is that of its last frame (the reference's decoder position
after reading the stack).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Union

import numpy as np
import torch

from video_features.models.base import Extractor, StackOptions
from video_features.models.i3d.weights import get_card, load_i3d, load_labels
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.transforms import center_crop, crop_views, resize_short_side
from video_features.utils.windows import SlidingWindows, stack_windows

log = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
#: GPU memory one frame pair takes in PWC-Net at 256x512 (a 256-short-side frame padded to
#: multiples of 64), fp32, cuDNN benchmark off: from measured peaks (64 pairs in bf16 ~2 GB);
#: bf16/fp16 halve it, RAFT's all-pairs volume doubles it
PAIR_BYTES = 64 << 20
#: the most memory flow batches are sized to (the peak target at defaults is 8 GB in all)
FLOW_MEMORY_CAP = 6 << 30
FLOW_TYPES = ("pwc", "raft")
WEIGHTS = {
    "reference": {"rgb": "i3d_rgb", "flow": "i3d_flow"},
    "imagenet": {"rgb": "pytorch_i3d_rgb_imagenet", "flow": "pytorch_i3d_flow_imagenet"},
    "charades": {"rgb": "pytorch_i3d_rgb_charades", "flow": "pytorch_i3d_flow_charades"},
}


def rgb_to_i3d(x: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1]."""
    return x * (2.0 / 255.0) - 1.0


def flow_to_i3d(flow: torch.Tensor) -> torch.Tensor:
    """Flow in pixels -> I3D input: clamp to [-20, 20], quantise as the released flow images
    (``round(128 + 255 / 40 * f)``, levels 0..256: +20 px is 255.5, which rounds to even 256,
    as in the reference), then map levels to [-1, 1] by ``2 * q / 255 - 1``."""
    q = torch.round(128.0 + 255.0 / 40.0 * flow.clamp(-20.0, 20.0))
    return q * (2.0 / 255.0) - 1.0


@dataclasses.dataclass
class I3DOptions(StackOptions):
    streams: List[str] = option("rgb, flow or both (space separated)", choices=STREAMS,
                                changes_values=True)
    flow_type: str = option("pwc (PWC-Net) or raft (RAFT)", choices=FLOW_TYPES, changes_values=True)
    weights: str = option("I3D checkpoints: reference (the reference tool's i3d_rgb.pt/i3d_flow.pt), "
                          "imagenet (pytorch-i3d rgb/flow_imagenet.pt) or charades "
                          "(rgb/flow_charades.pt)", choices=tuple(WEIGHTS), changes_values=True)
    spatial: bool = option("save the unpooled Mixed_5c feature maps (Tv x 1024 x t x 7 x 7) "
                           "instead of vectors", changes_values=True)
    checkpoint_path_rgb: Optional[str] = option("explicit I3D RGB checkpoint file")
    checkpoint_path_flow: Optional[str] = option("explicit I3D flow checkpoint file")
    flow_checkpoint_path: Optional[str] = option("explicit PWC-Net / RAFT checkpoint file")
    flow_batch_size: Union[int, str] = option(
        "frame pairs per optical-flow forward pass; auto: 16 on CPU, on a GPU what its free "
        "memory holds (at most 64 pairs, within FLOW_MEMORY_CAP); halved on running out of memory")
    raft_iters: int = option("RAFT refinement iterations", at_least=1, changes_values=True)
    raft_padding: str = option("unpad: crop RAFT's flow back to the frame (correct); reference: "
                               "keep the padded field before the centre crop, as the reference "
                               "tool does", choices=("unpad", "reference"), changes_values=True)


class I3DExtractor(Extractor):
    auto_batch_size = {"cpu": 1, "cuda": 4}
    schema = I3DOptions
    frame_seam = True
    # 2: the flow network runs at the precision option (bf16 / fp16 flow changed)
    revision = 2

    @classmethod
    def output_keys_for(cls, cfg: Config) -> tuple[str, ...]:
        return (*cfg.streams, "fps", "timestamps_ms")

    @classmethod
    def weights_for(cls, cfg: Config) -> dict:
        out = {s: (get_card(WEIGHTS[cfg.weights][s]), cfg.get(f"checkpoint_path_{s}"))
               for s in cfg.streams}
        if "flow" in cfg.streams:
            from video_features.models import flow_weights

            card = flow_weights.PWC_CARD if cfg.flow_type == "pwc" else flow_weights.RAFT_CARD
            out["flow_net"] = (card, cfg.flow_checkpoint_path)
        return out

    @classmethod
    def validate(cls, cfg: Config) -> None:
        if not cfg.streams or len(set(cfg.streams)) != len(cfg.streams):
            raise ConfigError(f"streams {cfg.streams!r} must be rgb, flow or both")
        if cfg.get("checkpoint_path"):
            raise ConfigError("checkpoint_path is ambiguous for i3d: use checkpoint_path_rgb, "
                              "checkpoint_path_flow or flow_checkpoint_path")
        fb = cfg.flow_batch_size
        if fb != "auto" and (isinstance(fb, bool) or not isinstance(fb, int) or fb < 1):
            raise ConfigError(f"option flow_batch_size must be auto or an integer >= 1, got {fb!r}")

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.streams = tuple(cfg.streams)
        self.output_keys = self.output_keys_for(cfg)
        allow_random = bool(cfg.allow_random_weights)
        self.nets = {}
        self.labels = {}
        for s in self.streams:
            card = get_card(WEIGHTS[cfg.weights][s])
            self.nets[s] = load_i3d(s, card.name, cfg.get(f"checkpoint_path_{s}"), allow_random, self.device)
            if cfg.show_pred:
                self.labels[s] = load_labels(card.extra.get("labels", "kinetics400"))
        self.flow_net = None
        #: frame pairs per flow forward pass; None: sized on the first frames (auto)
        self.flow_pairs = None if cfg.flow_batch_size == "auto" else int(cfg.flow_batch_size)
        if "flow" in self.streams:
            from video_features.models import flow_weights

            load = flow_weights.load_pwc if cfg.flow_type == "pwc" else flow_weights.load_raft
            self.flow_net = load(cfg.flow_checkpoint_path, allow_random, self.device)

    # -- per chunk ---------------------------------------------------------------------------
    def _flow(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.cfg.flow_type == "pwc":
            return self.flow_net.estimate(a, b)
        return self.flow_net.estimate(a, b, iters=self.cfg.raft_iters,
                                      unpad=self.cfg.raft_padding == "unpad")

    def _flow_into(self, flow: torch.Tensor, seq: torch.Tensor, need: np.ndarray) -> None:
        """Flow of the pairs ``(seq[i], seq[i + 1])`` for ``i`` in ``need`` (host indices), in
        batches of ``flow_pairs``, at the ``precision`` option as every network; a batch that
        runs out of GPU memory is retried at half the size. Pairs are cut from ``seq`` as slices
        of runs of consecutive indices: an index tensor would be a blocking copy to the GPU."""
        if self.flow_pairs is None:
            self.flow_pairs = self.auto_flow_pairs(*seq.shape[-2:])
        at = 0
        while at < len(need):
            runs = _runs(need[at:at + self.flow_pairs])
            try:
                with self.autocast():
                    f = self._flow(_cat([seq[a:b] for a, b in runs]),
                                   _cat([seq[a + 1:b + 1] for a, b in runs]))
            except torch.cuda.OutOfMemoryError:
                if self.flow_pairs == 1:
                    raise
                torch.cuda.empty_cache()
                self.flow_pairs = max(1, self.flow_pairs // 2)
                log.warning("optical flow ran out of GPU memory: %d frame pairs per batch from now on",
                            self.flow_pairs)
                continue
            f = flow_to_i3d(self.crop(f.float()))
            k = 0
            for a, b in runs:
                flow[a:b] = f[k:k + b - a]
                k += b - a
            at += k

    def auto_flow_pairs(self, h: int, w: int) -> int:
        """``flow_batch_size: auto`` for frames of ``h x w``: 16 on the CPU; on a GPU as many
        pairs as half its free memory (at most FLOW_MEMORY_CAP) holds, between 1 and 64."""
        if self.device.type != "cuda":
            return 16
        free, _ = torch.cuda.mem_get_info(self.device)
        per = PAIR_BYTES * (-(-h // 64) * 64) * (-(-w // 64) * 64) / (256 * 512)
        per *= 0.5 if self.cfg.get("precision", "fp32") != "fp32" else 1.0
        per *= 2.0 if self.cfg.flow_type == "raft" else 1.0
        pairs = int(min(free // 2, FLOW_MEMORY_CAP) // per)
        log.info("flow_batch_size auto: %d frame pairs of %dx%d (%.0f MB free on %s)",
                 max(1, min(64, pairs)), w, h, free / 2**20, self.device)
        return max(1, min(64, pairs))

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Resized frames or flow fields -> the network's 224 x 224 crops: the reference's
        centre crop at ``(H - 224) // 2``, or the ``crops`` views around it. A flow field is
        cropped and flipped as an image, as TenCrop treats the released flow JPEGs."""
        return crop_views(x, 224, self.cfg.crops, lambda y: center_crop(y, 224, offset="floor"))

    def chunk_frames(self) -> int:
        return max(self.cfg.stack_size, 8)

    def begin(self, work) -> None:
        cfg = self.cfg
        work.state = _I3DVideo({s: SlidingWindows(cfg.stack_size, cfg.step_size, cfg.tail)
                                for s in self.streams})

    def elements(self, state: "_I3DVideo", frames: torch.Tensor,
                 stamps: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """The elements a chunk of frames completes, per stream (rgb ``(n, 3, 224, 224)``, flow
        ``(n, 2, 224, 224)``), and the timestamp of the frame after each element."""
        cfg = self.cfg
        resized = resize_short_side(frames, 256)
        seq = resized if state.prev is None else torch.cat([state.prev[None], resized])
        n = len(seq) - 1                      # elements completed by this chunk
        state.prev = seq[-1].clone()
        if n <= 0:
            return {}, np.zeros(0, np.float64)
        out = {}
        for stream in self.streams:
            if stream == "rgb":
                out["rgb"] = rgb_to_i3d(self.crop(seq[:n]))
                continue
            # flow only for elements some stack uses (step_size > stack_size skips some)
            views = () if self.views == 1 else (self.views,)
            flow = torch.zeros((n, *views, 2, 224, 224), device=self.device)
            idx = np.arange(state.index, state.index + n)
            self._flow_into(flow, seq, np.flatnonzero((idx % cfg.step_size) < cfg.stack_size))
            out["flow"] = flow
        state.index += n
        return out, np.asarray(stamps[-n:], np.float64)  # element i ends at frame i + 1

    @staticmethod
    def _stacks(windows: dict[str, list]) -> list:
        stacked = {stream: stack_windows(wins) for stream, wins in windows.items()}
        return [(stream, *st) for stream, st in stacked.items() if st]

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        elements, ts = self.elements(work.state, frames, stamps)
        return self._stacks({s: work.state.windows[s].push(e, ts) for s, e in elements.items()})

    def end_frames(self, work, end_s: float | None = None) -> list:
        return self._stacks({s: w.finish() for s, w in work.state.windows.items()})

    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 2, 1, 3, 4).contiguous()  # (B, T, C, H, W) -> (B, C, T, H, W)
        net = self.nets[key]
        return net.feature_maps(x) if self.cfg.spatial else net.features(x)

    def _predict(self, net: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
        pooled = net._avg_pool(feats).mean(dim=(2, 3, 4)) if self.cfg.spatial else feats
        logits = net.classify(pooled)
        # Charades is multi-label (sigmoid); Kinetics single-label (softmax)
        return torch.sigmoid(logits) if net.num_classes == 157 else torch.softmax(logits, -1)

    def finish(self, work) -> dict[str, np.ndarray]:
        cfg = self.cfg
        result: dict[str, np.ndarray] = {}
        stamps = None
        for s in self.streams:
            feats, stamps = rows_of(work, s)
            if feats is None:
                raise VideoError(f"too short: a stack needs stack_size + 1 = {cfg.stack_size + 1} "
                                 f"frames, the video has {work.frames} at {work.fps:g} fps")
            if cfg.show_pred:
                probs = self.over_views(lambda f, net=self.nets[s]: self._predict(net, f), feats)
                self.print_predictions(f"{work.path} {s} stack", probs, self.labels[s])
            result[s] = feats.float().cpu().numpy()
        result["fps"] = np.array(work.fps, dtype=np.float64)
        result["timestamps_ms"] = self.row_times(work, stamps, lead_frames=1)
        return result


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices -> ``[start, end)`` runs of consecutive ones."""
    cuts = np.flatnonzero(np.diff(index) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(index, cuts) if len(r)]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclasses.dataclass
class _I3DVideo:
    """Per-video state: stack windows per stream, the last resized frame (flow needs the pair
    across chunks) and the index of the next element."""

    windows: dict
    prev: torch.Tensor | None = None
    index: int = 0
