"""I3D two-stream features: RGB and optical-flow stacks -> 1024-d vectors (or feature maps).

Data flow for one video, all on the device after decoding:

    chunk of frames -> resize (short side 256, PIL-like) -> RGB: centre crop 224, to [-1, 1]
                                                     -> flow: pairs of consecutive frames
    flow pairs, batched ``flow_batch_size`` at a time across chunks and videos of one frame size
    (utils/pipeline.py) -> PWC-Net or RAFT at the ``precision`` option, or TV-L1 (float32, on the
    8-bit gray of the resized frames, as Kinetics' flow was made) -> centre crop 224,
    clamped/quantised to [-1, 1] -> back to their video in order
    -> sliding windows per stream -> stacks, batched with those of other videos -> I3D per stream.

An element of the stream is frame ``i`` together with the flow from frame ``i`` to ``i + 1``,
so a stack of ``stack_size`` elements covers ``stack_size + 1`` frames, as in the reference
tool. Overlapping stacks (``step_size < stack_size``) share elements, so no frame is resized and
no flow is computed twice; with ``step_size > stack_size`` the flow of frames no stack uses is
never computed. A stack's timestamp is that of its last frame (the reference's decoder position
after reading the stack).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import List, Optional, Union

import numpy as np
import torch

from video_features.models.base import Extractor, StackOptions
from video_features.models.i3d.weights import get_card, load_i3d, load_labels
from video_features.models.tvl1.options import TVL1Options, check_tvl1_options
from video_features.utils.config import Config, option
from video_features.utils.errors import ConfigError, VideoError
from video_features.utils.pipeline import rows_of
from video_features.utils.transforms import center_crop, crop_views, resize_short_side
from video_features.utils.windows import SlidingWindows, stack_windows

log = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
#: the work items of the flow network: frame pairs, batched across chunks and videos
PAIRS = "flow_pairs"
#: GPU memory one frame pair takes in PWC-Net at 256x512 (a 256-short-side frame padded to
#: multiples of 64), fp32, cuDNN benchmark off: from measured peaks (64 pairs in bf16 ~2 GB);
#: bf16/fp16 halve it, RAFT's all-pairs volume doubles it
PAIR_BYTES = 64 << 20
#: GPU memory one frame pair takes in TV-L1 at 256x341 (its pyramid, warped images, flow, dual
#: variables and the temporaries of the warp and the median filter), any precision: 17-18 MB
#: measured by bench/tvl1_memory.py (the GPU's tensor-op parts, on the CPU)
TVL1_PAIR_BYTES = 18 << 20
#: the most memory flow batches are sized to (the peak target at defaults is 8 GB in all)
FLOW_MEMORY_CAP = 6 << 30
FLOW_TYPES = ("pwc", "raft", "tvl1")
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
class I3DOptions(StackOptions, TVL1Options):
    streams: List[str] = option("rgb, flow or both (space separated)", choices=STREAMS,
                                changes_values=True)
    flow_type: str = option("pwc (PWC-Net), raft (RAFT) or tvl1 (Dual TV-L1, the flow the "
                            "original I3D was trained on; tvl1_* options)", choices=FLOW_TYPES,
                            changes_values=True)
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
        if "flow" in cfg.streams and cfg.flow_type != "tvl1":   # TV-L1 has no weights
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
        if cfg.flow_type == "tvl1":
            if cfg.flow_checkpoint_path:
                raise ConfigError("option flow_checkpoint_path is for flow_type=pwc or raft: "
                                  "TV-L1 has no weights")
            check_tvl1_options(cfg)

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.streams = tuple(cfg.streams)
        self.output_keys = self.output_keys_for(cfg)
        allow_random = bool(cfg.allow_random_weights)
        self.nets = {}
        self.labels = {}
        # CPUs run I3D in channels-last layout, oneDNN's fast path for 3D convolutions: one
        # 64-frame 224x224 stack on 2 cores took 1.4 s instead of 1.75 s (features within 2e-7
        # relative). GPUs keep the default layout.
        self.channels_last = self.device.type == "cpu"
        for s in self.streams:
            card = get_card(WEIGHTS[cfg.weights][s])
            self.nets[s] = load_i3d(s, card.name, cfg.get(f"checkpoint_path_{s}"), allow_random, self.device)
            if self.channels_last and isinstance(self.nets[s], torch.nn.Module):
                self.nets[s] = self.nets[s].to(memory_format=torch.channels_last_3d)
            if cfg.show_pred:
                self.labels[s] = load_labels(card.extra.get("labels", "kinetics400"))
        self.flow_net = None
        #: frame pairs per flow forward pass; None: sized on the first frames (auto)
        self.flow_pairs = None if cfg.flow_batch_size == "auto" else int(cfg.flow_batch_size)
        if "flow" in self.streams:
            from video_features.models.flow_weights import load_flow_net

            self.flow_net = load_flow_net(cfg, allow_random, self.device)

    # -- per chunk ---------------------------------------------------------------------------
    def _flow(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from video_features.models.flow_weights import estimate_flow

        return estimate_flow(self.flow_net, self.cfg, a, b)

    def batch_size_of(self, key: str) -> int:
        """Stacks per I3D batch (``batch_size``); frame pairs per flow batch (``flow_pairs``)."""
        if key == PAIRS:
            return self.flow_pairs or 16
        return self.cfg.batch_size

    def run_batch(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        if key != PAIRS:
            return super().run_batch(key, batch)
        with self.autocast():   # the precision option, as for every network
            return self._flow_elements(batch)

    def _flow_elements(self, pairs: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3, H, W) uint8 frame pairs -> I3D flow elements (B, [views,] 2, 224, 224);
        a batch that runs out of GPU memory is split in halves, and later batches are sized at
        half (one warning each time)."""
        try:
            f = self._flow(pairs[:, 0].float(), pairs[:, 1].float())
        except torch.cuda.OutOfMemoryError:
            if len(pairs) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(pairs) // 2
            if self.flow_pairs is None or self.flow_pairs > half:
                self.flow_pairs = max(1, half)
                log.warning("optical flow ran out of GPU memory: %d frame pairs per batch from now "
                            "on", self.flow_pairs)
            out, at = [], 0
            while at < len(pairs):   # at the size in force (a part may lower it again)
                part = pairs[at:at + self.flow_pairs]
                out.append(self._flow_elements(part))
                at += len(part)
            return torch.cat(out)
        return flow_to_i3d(self.crop(f.float()))

    def auto_flow_pairs(self, h: int, w: int) -> int:
        """``flow_batch_size: auto`` for frames of ``h x w``: 16 on the CPU; on a GPU as many
        pairs as half its free memory (at most FLOW_MEMORY_CAP) holds, between 1 and 64."""
        if self.device.type != "cuda":
            return 16
        free, _ = torch.cuda.mem_get_info(self.device)
        if self.cfg.flow_type == "tvl1":
            per = TVL1_PAIR_BYTES * h * w / (256 * 341)
        else:
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
        """What a chunk of frames completes: RGB elements ``rgb (n, 3, 224, 224)``, and the frame
        pairs ``pairs (k, 2, 3, H, W)`` (uint8, resized) of the flow elements some stack uses
        (``step_size > stack_size`` skips the others, which are zeros); with the timestamp of
        the frame after each of the n elements. The flow stream's plan (which elements are
        computed, which are zeros) is noted in ``state``."""
        cfg = self.cfg
        resized = resize_short_side(frames, 256)
        seq = resized if state.prev is None else torch.cat([state.prev[None], resized])
        n = len(seq) - 1                      # elements completed by this chunk
        state.prev = seq[-1].clone()
        if n <= 0:
            return {}, np.zeros(0, np.float64)
        ts = np.asarray(stamps[-n:], np.float64)  # element i ends at frame i + 1
        out = {}
        if "rgb" in self.streams:
            out["rgb"] = rgb_to_i3d(self.crop(seq[:n]))
        if "flow" in self.streams:
            if self.flow_pairs is None:
                self.flow_pairs = self.auto_flow_pairs(*seq.shape[-2:])
            need = (np.arange(state.index, state.index + n) % cfg.step_size) < cfg.stack_size
            state.plan.append([need, ts])
            runs = _runs(np.flatnonzero(need))   # slices: an index tensor is a copy to the GPU
            if runs:
                levels = seq.round().clamp(0, 255).to(torch.uint8)   # whole levels: exact
                out["pairs"] = _cat([torch.stack([levels[a:b], levels[a + 1:b + 1]], 1)
                                     for a, b in runs])
                out["pair_stamps"] = ts[need]
        state.index += n
        return out, ts

    @staticmethod
    def _stacks(windows: dict[str, list]) -> list:
        stacked = {stream: stack_windows(wins) for stream, wins in windows.items()}
        return [(stream, *st) for stream, st in stacked.items() if st]

    def add_frames(self, work, frames: torch.Tensor, stamps: np.ndarray) -> list:
        st = work.state
        elements, ts = self.elements(st, frames, stamps)
        items = []
        if "rgb" in elements:
            items += self._stacks({"rgb": st.windows["rgb"].push(elements["rgb"], ts)})
        if "pairs" in elements:   # batched with other chunks' and videos' pairs
            items.append((PAIRS, elements["pairs"], elements["pair_stamps"]))
        if "flow" in self.streams:
            items += self._flow_stacks(st)
        return items

    def keep_rows(self, work, key: str, rows, stamps: np.ndarray):
        if key != PAIRS:
            return super().keep_rows(work, key, rows, stamps)
        work.state.flow.append(rows)
        return self._flow_stacks(work.state)

    def _flow_stacks(self, st: "_I3DVideo") -> list:
        """Flow elements in order as far as they are known (zeros for the skipped ones, flow
        for the computed ones that are back) into the flow windows -> stacks; the padded tail
        once the video has ended and every element is in."""
        elems, times = [], []
        while st.plan:
            need, ts = st.plan[0]
            k = int(np.argmin(need == need[0])) or len(need)   # the run of need[0] in front
            if need[0]:
                k = min(k, sum(len(r) for r in st.flow))
                if k == 0:
                    break    # its flow is not back yet
                elems.append(_take(st.flow, k))
            else:
                views = () if self.views == 1 else (self.views,)
                elems.append(torch.zeros((k, *views, 2, 224, 224), device=self.device))
            times.append(ts[:k])
            if k == len(need):
                st.plan.popleft()
            else:
                st.plan[0] = [need[k:], ts[k:]]
        windows = st.windows["flow"]
        wins = windows.push(_cat(elems), np.concatenate(times)) if elems else []
        if st.ended and not st.plan:
            wins += windows.finish()
        return self._stacks({"flow": wins})

    def end_frames(self, work, end_s: float | None = None) -> list:
        st = work.state
        st.ended = True
        items = self._stacks({"rgb": st.windows["rgb"].finish()}) if "rgb" in self.streams else []
        if "flow" in self.streams:
            items += self._flow_stacks(st)
        return items

    def forward(self, key: str, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W) -> (B, C, T, H, W)
        x = x.contiguous(memory_format=torch.channels_last_3d if self.channels_last
                         else torch.contiguous_format)
        net = self.nets[key]
        return net.feature_maps(x).contiguous() if self.cfg.spatial else net.features(x)

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


def _take(blocks: collections.deque, k: int) -> torch.Tensor:
    """The first ``k`` rows of a deque of row blocks, removed from it."""
    out, n = [], 0
    while n < k:
        block = blocks.popleft()
        if n + len(block) > k:
            blocks.appendleft(block[k - n:])
            block = block[:k - n]
        out.append(block)
        n += len(block)
    return _cat(out)


@dataclasses.dataclass
class _I3DVideo:
    """Per-video state: stack windows per stream, the last resized frame (flow needs the pair
    across chunks), the index of the next element; for the flow stream, which elements are
    computed (``plan``: blocks of [computed?, timestamps]) and the computed ones back from
    their batches, not yet in a window (``flow``); ``ended``: the video's frames are over."""

    windows: dict
    prev: torch.Tensor | None = None
    index: int = 0
    plan: collections.deque = dataclasses.field(default_factory=collections.deque)
    flow: collections.deque = dataclasses.field(default_factory=collections.deque)
    ended: bool = False
