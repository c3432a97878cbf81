"""``video-features finetune``: fine-tune I3D on labelled videos, then extract with the result.

The recipe of pytorch-i3d's Charades training is the default (every number an option): clips of
64 frames at a random start, per-frame multi-hot labels, a random 224 crop and a horizontal flip
(centre crop for evaluation); SGD lr 0.1, momentum 0.9, weight decay 1e-7, MultiStepLR at steps
300 and 1000, gradients accumulated over 4 batches; loss = 0.5 * BCE of the per-frame logits
(upsampled to the clip length) + 0.5 * BCE of their maximum over time.

Differences from that script, on purpose: frames come through the extractor's own decoding
(videos or frame folders, no JPEG dump needed) and are resized to a short side of 256 as the
extractor sees them (pytorch-i3d crops Charades frames at their stored size); flow is computed
on the fly with the extractor's PWC-Net or RAFT (or read from x/y JPEG folders); the data order
and every random choice derive from ``seed`` and the batch number, so a resumed run continues
exactly where it stopped; evaluation reports Charades' video-level mAP and the per-frame mAP of
its localisation task.

Outputs in ``output_dir``: ``state.pt`` (everything to resume), ``last_<stream>.pt`` and
``best_<stream>.pt`` in the starting checkpoint's public layout (``checkpoint_path_rgb=...`` /
``checkpoint_path_flow=...`` of ``--feature_type i3d`` with the same ``weights`` family loads
them; the class count is read from the file), each with a ``.json`` sidecar of the options,
classes and scores, and ``log.jsonl`` (one line per evaluation).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from video_features.finetune_options import WEIGHTS
from video_features.utils.config import Config
from video_features.utils.errors import ConfigError, FeatureError, VideoError

log = logging.getLogger(__name__)

def load_annotations(cfg: Config, path: str, num_classes: int | None = None):
    from video_features.utils import annotations as ann

    if cfg.data_format == "charades":
        return ann.read_charades(path, cfg.video_root)
    return ann.read_generic(path, cfg.video_root, num_classes)


# -- data ----------------------------------------------------------------------------------------
def _rng(*key: int) -> np.random.Generator:
    """A generator that depends only on ``key`` (seed, batch, item): the same choices after a
    resume, in any data-loading process."""
    return np.random.default_rng([abs(int(k)) for k in key])


class ClipBatches:
    """Micro-batch ``m`` -> ``batch_size`` training clips: items ``m * B ...`` of an endless
    sequence of shuffled epochs over the samples; this process's share when distributed."""

    def __init__(self, cfg: Config, samples: list, num_classes: int, rank: int = 0, world: int = 1):
        self.cfg, self.samples, self.num_classes = cfg, samples, num_classes
        self.rank, self.world = rank, world
        self._perms: dict[int, np.ndarray] = {}
        self._length: dict[str, float] = {}

    def item(self, k: int) -> int:
        n = len(self.samples)
        epoch, at = divmod(k, n)
        if epoch not in self._perms:
            self._perms = {epoch: _rng(self.cfg.seed, 1, epoch).permutation(n)}
        return int(self._perms[epoch][at])

    def __getitem__(self, m: int) -> dict:
        """The clips of micro-batch ``m`` and the inputs that failed to decode (each replaced
        by another input, drawn from the same seeded generator)."""
        B = self.cfg.batch_size
        first = (m * self.world + self.rank) * B
        clips, failed = [], []
        for j in range(B):
            k = first + j
            idx = self.item(k)
            for attempt in range(8):
                try:
                    clips.append(self.clip(self.samples[idx], _rng(self.cfg.seed, 2, m, k, attempt)))
                    break
                except FeatureError as exc:
                    failed.append((self.samples[idx].video, str(exc)))
                    idx = int(_rng(self.cfg.seed, 3, m, k, attempt).integers(len(self.samples)))
            else:
                raise VideoError(f"batch {m}: 8 inputs in a row failed to decode, e.g. "
                                 f"{failed[-1][0]}: {failed[-1][1]}")
        return {"clips": clips, "failed": failed}

    def duration(self, sample: Any) -> float:
        from video_features.utils.video import media_info

        if sample.video not in self._length:
            length = sample.length_s
            if not length:
                info = media_info(sample.video)
                length = info.get("duration_s") or (info.get("images", 0) / self.cfg.fps)
            self._length[sample.video] = float(length or 0.0)
        return self._length[sample.video]

    def clip(self, sample: Any, rng: np.random.Generator) -> dict:
        """One training clip: frames (resized; rgb cropped and maybe flipped), labels."""
        cfg = self.cfg
        T = cfg.clip_frames
        need = T + 1 if cfg.stream == "flow" and cfg.flow_source == "net" else T
        span = max(0.0, self.duration(sample) - need / cfg.fps)
        start = int(rng.random() * span * cfg.fps)
        frames = read_frames(sample.video, cfg, start, need) if cfg.stream == "rgb" or \
            cfg.flow_source == "net" else read_flow_jpgs(sample.video, cfg, start, T)
        times = (start + np.arange(T)) / cfg.fps
        from video_features.utils.annotations import frame_labels

        labels = np.asarray(frame_labels(sample, times, self.num_classes), np.uint8)
        h, w = frames.shape[-2:]
        c = cfg.crop_size
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        flip = bool(rng.random() < 0.5)
        out = {"labels": labels, "crop": (top, left, flip), "video": sample.video}
        if cfg.stream == "flow" and cfg.flow_source == "net":
            out["frames"] = frames          # flow needs whole frames: cropped after it
        else:
            out["frames"] = crop(frames, top, left, c, flip)
        return out


def read_frames(path: str, cfg: Config, start: int = 0, count: int | None = None):
    """``count`` frames (None: all) from frame ``start`` at ``cfg.fps``, resized (short side
    ``side_size``): uint8 ``(count, 3, h, w)``; a clip past the end repeats the last frame."""

    from video_features.utils.transforms import resize_short_side
    from video_features.utils.video import open_frames

    end = math.inf if count is None else start + count
    got, seen = [], 0
    with open_frames(path, cfg.fps, frames_fps=cfg.fps) as src:
        for chunk in src.chunks(32):
            n = len(chunk.frames)
            lo, hi = max(0, start - seen), min(n, end - seen)
            if lo < hi:
                got.append(torch.from_numpy(np.ascontiguousarray(chunk.frames[lo:hi])))
            seen += n
            if seen >= end:
                break
    if not got:
        if seen == 0:
            raise VideoError("no frames")
        return read_frames(path, cfg, max(0, seen - (count or seen)), count)
    x = torch.cat(got).permute(0, 3, 1, 2)
    if count is not None and len(x) < count:
        x = torch.cat([x, x[-1:].expand(count - len(x), -1, -1, -1)])
    return resize_short_side(x, cfg.side_size).round().clamp(0, 255).to(torch.uint8)


def read_flow_jpgs(video: str, cfg: Config, start: int, count: int):
    """x/y JPEG flow of frames ``start ...`` (pytorch-i3d's and ``flow_format=jpg``'s naming,
    1-based): uint8 ``(count, 2, h, w)`` resized like frames; missing tail files repeat the last."""
    from PIL import Image

    from video_features.utils.transforms import resize_short_side

    stem = Path(video).stem if Path(video).is_file() else Path(video).name
    folder = Path(cfg.flow_root) / stem
    pairs = []
    for i in range(start + 1, start + count + 1):
        fx, fy = folder / f"{stem}-{i:06d}x.jpg", folder / f"{stem}-{i:06d}y.jpg"
        if not fx.is_file() or not fy.is_file():
            if not pairs:
                raise VideoError(f"no flow JPEGs {fx.name} / {fy.name} in {folder}")
            pairs.append(pairs[-1])
            continue
        pairs.append(np.stack([np.asarray(Image.open(fx).convert("L")),
                               np.asarray(Image.open(fy).convert("L"))]))
    x = torch.from_numpy(np.stack(pairs))
    return resize_short_side(x, cfg.side_size).round().clamp(0, 255).to(torch.uint8)


def crop(x, top: int, left: int, size: int, flip: bool):
    x = x[..., top:top + size, left:left + size]
    return x.flip(-1) if flip else x


# -- the network -------------------------------------------------------------------------------
def build_model(cfg: Config, num_classes: int, device: Any):
    """The starting I3D in training mode, its classifier replaced when the class count differs."""

    from video_features.models.i3d.weights import load_i3d

    card = WEIGHTS[cfg.weights][cfg.stream]
    model = load_i3d(cfg.stream, card, cfg.checkpoint_path, cfg.allow_random_weights, device)
    if model.num_classes != num_classes:
        log.info("new %d-class classifier (the starting checkpoint has %d classes)",
                 num_classes, model.num_classes)
        torch.manual_seed(cfg.seed)
        model.replace_logits(num_classes)
    model.dropout.p = cfg.dropout
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = cfg.bn_momentum
    return model.requires_grad_(True).train()


class Inputs:
    """Clips of a batch -> the network input on the device (flow computed here when needed)."""

    def __init__(self, cfg: Config, device: Any):
        self.cfg, self.device = cfg, device
        self.flow_net = None
        if cfg.stream == "flow" and cfg.flow_source == "net":
            from video_features.models.flow_weights import load_flow_net

            self.flow_net = load_flow_net(cfg, cfg.allow_random_weights, device)

    def __call__(self, clips: list[dict]):

        xs = [self.one(c["frames"].to(self.device), c["crop"]) for c in clips]
        return torch.stack(xs).transpose(1, 2)          # (B, C, T, H, W)

    def one(self, frames, where: tuple[int, int, bool] | None):
        """uint8 frames (rgb) or flow levels (jpg) or frames to compute flow on -> (T, C, c, c)
        in [-1, 1]; ``where`` = (top, left, flip), or None for the centre crop."""

        from video_features.models.flow_weights import estimate_flow
        from video_features.models.i3d.extractor import flow_to_i3d, rgb_to_i3d
        from video_features.utils.transforms import center_crop

        c = self.cfg.crop_size
        if self.flow_net is None:
            x = frames.float()
            if where is None:
                x = center_crop(x, c)
            return rgb_to_i3d(x)        # the jpg levels map to [-1, 1] alike
        with torch.no_grad():
            f = frames.float()
            a, b = f[:-1], f[1:]
            flow = torch.cat([estimate_flow(self.flow_net, self.cfg, a[i:i + 16], b[i:i + 16])
                              for i in range(0, len(a), 16)])
        flow = center_crop(flow, c) if where is None else crop(flow, *where[:2], c, where[2])
        return flow_to_i3d(flow)


def clip_loss(time_logits, labels, cfg: Config):
    """pytorch-i3d's loss: per-frame BCE of the logits upsampled to the clip's frames, and BCE
    of their maximum over time against the clip's labels."""

    per_frame = F.interpolate(time_logits, size=labels.shape[-1], mode="linear", align_corners=False)
    frame = F.binary_cross_entropy_with_logits(per_frame, labels)
    video = F.binary_cross_entropy_with_logits(per_frame.max(2)[0], labels.max(2)[0])
    return cfg.frame_loss_weight * frame + cfg.video_loss_weight * video, frame, video


# -- evaluation --------------------------------------------------------------------------------
def evaluate(model, inputs: Inputs, samples: list, cfg: Config, num_classes: int) -> dict:
    """Video-level mAP (the maximum over frames of each class's probability, against the classes
    present) and per-frame mAP at ``eval_points`` evenly spaced frames per video. Every frame of a
    video goes through the network in windows of ``clip_frames``; inputs that fail are counted."""

    from video_features.utils.annotations import frame_labels
    from video_features.utils.metrics import mean_average_precision

    was_training = model.training
    model.eval()
    video_scores, video_labels, frame_scores, frame_truth, failed = [], [], [], [], 0
    todo = samples[: cfg.max_eval_videos] if cfg.max_eval_videos else samples
    T = cfg.clip_frames
    with torch.no_grad():
        for sample in todo:
            try:
                frames = _all_frames(sample.video, cfg)
            except FeatureError as exc:
                failed += 1
                log.warning("evaluation: %s left out: %s", sample.video, exc)
                continue
            probs = []
            step = T
            for s in range(0, len(frames), step):
                part = frames[s:s + step + 1] if inputs.flow_net is not None else frames[s:s + step]
                n = len(part) - (1 if inputs.flow_net is not None else 0)
                if n <= 0:
                    break
                x = inputs.one(part.to(inputs.device), None).transpose(0, 1)[None]
                if x.shape[2] < 9:   # the network needs 9 frames: repeat the last
                    x = torch.cat([x, x[:, :, -1:].expand(-1, -1, 9 - x.shape[2], -1, -1)], 2)
                with _autocast(cfg, inputs.device):
                    logits = model.time_logits(x).float()
                probs.append(torch.sigmoid(F.interpolate(logits, size=x.shape[2], mode="linear",
                                                         align_corners=False))[0, :, :n])
            p = torch.cat(probs, 1).cpu().numpy()       # (classes, frames)
            video_scores.append(p.max(1))
            video_labels.append(sample.labels(num_classes))
            at = np.linspace(0, p.shape[1] - 1, cfg.eval_points).round().astype(int)
            frame_scores.append(p[:, at].T)
            frame_truth.append(np.asarray(frame_labels(sample, at / cfg.fps, num_classes)).T)
    model.train(was_training)
    if not video_scores:
        return {"video_map": float("nan"), "frame_map": float("nan"), "videos": 0, "failed": failed}
    return {"video_map": mean_average_precision(np.array(video_labels), np.array(video_scores)),
            "frame_map": mean_average_precision(np.concatenate(frame_truth), np.concatenate(frame_scores)),
            "videos": len(video_scores), "failed": failed}


def _all_frames(path: str, cfg: Config):
    if cfg.stream == "flow" and cfg.flow_source == "jpg":
        from video_features.utils.video import media_info

        info = media_info(path)
        n = int((info.get("duration_s") or info.get("images", 0) / cfg.fps) * cfg.fps) or 1
        return read_flow_jpgs(path, cfg, 0, n)
    return read_frames(path, cfg)


def _autocast(cfg: Config, device: Any):

    if cfg.precision == "bf16" and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(model, cfg: Config, name: str, meta: dict) -> Path:
    """``name`` in the starting checkpoint's public layout, with its sidecar."""

    from video_features.models.i3d.weights import export_state_dict, get_card
    from video_features.utils.output import atomic_write

    layout = get_card(WEIGHTS[cfg.weights][cfg.stream]).layout
    path = Path(cfg.output_dir) / f"{name}_{cfg.stream}.pt"
    state = export_state_dict(model.state_dict(), layout)
    atomic_write(path, lambda f: torch.save(state, f))
    option = f"checkpoint_path_{cfg.stream}"
    sidecar = {**meta, "layout": layout, "extract_with":
               f"--feature_type i3d streams={cfg.stream} weights={cfg.weights} {option}={path}"}
    text = json.dumps(sidecar, indent=1, default=str).encode()
    atomic_write(path.with_suffix(".json"), lambda f: f.write(text))
    return path


# -- training ----------------------------------------------------------------------------------
def train(cfg: Config) -> dict:
    """Fine-tune as ``cfg`` says; returns the last evaluation (or the training loss)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:  # torchrun
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cfg.device == "cuda"
                          else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    train_ann = load_annotations(cfg, cfg.train_annotations, cfg.num_classes)
    num_classes = cfg.num_classes or train_ann.num_classes
    test_ann = load_annotations(cfg, cfg.test_annotations, num_classes) if cfg.test_annotations else None
    if not train_ann.samples:
        raise ConfigError(f"{cfg.train_annotations}: no training input was found "
                          f"({train_ann.missing} listed but missing)")
    log.info("fine-tuning I3D %s on %d videos (%d missing), %d classes; %s", cfg.stream,
             len(train_ann.samples), train_ann.missing, num_classes,
             f"evaluating on {len(test_ann.samples)}" if test_ann else "no evaluation split")

    model = build_model(cfg, num_classes, device)
    inputs = Inputs(cfg, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), cfg.gamma)
    step, best, skipped, rng_state = 0, -math.inf, 0, None
    state_path = out / "state.pt"
    if cfg.resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["num_classes"] != num_classes or state["stream"] != cfg.stream:
            raise ConfigError(f"{state_path} is a {state['stream']} run with {state['num_classes']} "
                              f"classes; use another output_dir or resume=false")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, skipped = state["step"], state["best"], state.get("skipped", 0)
        rng_state = state["rng"]
        log.info("resumed from %s at step %d", state_path, step)
    net = TimeLogits(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    batches = ClipBatches(cfg, train_ann.samples, num_classes, rank, world)
    first = step * cfg.accumulate
    loader = iter(torch.utils.data.DataLoader(
        batches, batch_size=None, num_workers=cfg.num_workers,
        sampler=range(first, cfg.max_steps * cfg.accumulate), collate_fn=_as_is,
        prefetch_factor=2 if cfg.num_workers else None))
    if rng_state is not None:  # after the loader drew its workers' seed, as the first run did
        torch.set_rng_state(rng_state)
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=rank != 0 or not _progress_on(cfg))
    result: dict = {"step": step}
    losses, clips_seen, t0 = [], 0, time.perf_counter()
    warned: set[str] = set()
    optimizer.zero_grad(set_to_none=True)
    for m, batch in enumerate(loader, start=first):
        for video, why in batch["failed"]:
            skipped += 1
            if video not in warned:
                warned.add(video)
                log.warning("left out of training: %s: %s", video, why)
        clips = batch["clips"]
        labels = torch.from_numpy(np.stack([c["labels"] for c in clips])).float().to(device)
        x = inputs(clips)
        last_micro = (m + 1) % cfg.accumulate == 0
        sync = net.no_sync() if world > 1 and not last_micro else _nothing()
        with sync, _autocast(cfg, device):
            loss, frame_loss, video_loss = clip_loss(net(x).float(), labels, cfg)
            (loss / cfg.accumulate).backward()
        losses.append(float(loss.detach()))
        clips_seen += len(clips)
        if not last_micro:
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        rate = clips_seen / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-cfg.accumulate:]):.4f}", clips_s=f"{rate:.1f}")
        result = {"step": step, "loss": float(np.mean(losses[-cfg.accumulate:])),
                  "lr": scheduler.get_last_lr()[0], "clips_per_s": rate, "skipped_clips": skipped}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            if rank == 0:
                if test_ann is not None:
                    result.update(evaluate(model, inputs, test_ann.samples, cfg, num_classes))
                meta = {"options": cfg.to_dict(), "num_classes": num_classes,
                        "class_names": train_ann.class_names, "starting_weights": cfg.checkpoint_path
                        or WEIGHTS[cfg.weights][cfg.stream], **result}
                save_checkpoint(model, cfg, "last", meta)
                score = result.get("video_map", -result["loss"])
                if not math.isnan(score) and score > best:
                    best = score
                    save_checkpoint(model, cfg, "best", meta)
                _append_log(out / "log.jsonl", result)
                _save_state(state_path, model, optimizer, scheduler, step, best, skipped,
                            num_classes, cfg.stream)
                log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" if isinstance(v, float)
                                                        else f"{k} {v}" for k, v in result.items()))
            if world > 1:
                dist.barrier()
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return result


def _as_is(batch: Any) -> Any:
    return batch


class TimeLogits(torch.nn.Module):
    """I3D whose forward gives the per-time logits (what DistributedDataParallel wraps)."""

    def __init__(self, i3d: Any):
        super().__init__()
        self.i3d = i3d

    def forward(self, x: Any) -> Any:
        return self.i3d.time_logits(x)


def _nothing():
    return contextlib.nullcontext()


def _progress_on(cfg: Config) -> bool:
    return sys.stderr.isatty() if cfg.progress == "auto" else bool(cfg.progress)


def _save_state(path: Path, model, optimizer, scheduler, step: int, best: float, skipped: int,
                num_classes: int, stream: str) -> None:

    from video_features.utils.output import atomic_write

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "best": best, "skipped": skipped,
             "rng": torch.get_rng_state(), "num_classes": num_classes, "stream": stream}
    atomic_write(path, lambda f: torch.save(state, f))


def _append_log(path: Path, result: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), **result}, default=str) + "\n")
