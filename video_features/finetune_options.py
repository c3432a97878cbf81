"""``video-features finetune``'s options and command line, apart from the training code
(video_features/finetune.py), so that ``--help`` and usage errors answer without importing torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Union

from video_features.models.tvl1.options import TVL1Options, check_tvl1_options
from video_features.utils.config import (CONFIG_DIR, Config, _add_option, _did_you_mean,
                                         _from_text, _omegaconf_error, _split_words,
                                         check_fields, option, parse_flags, read_yaml,
                                         schema_fields)
from video_features.utils.errors import ConfigError, FeatureError

CONFIG_FILE = CONFIG_DIR / "finetune.yml"
#: starting weights per family and stream (cards of models/i3d/weights.py)
WEIGHTS = {
    "imagenet": {"rgb": "pytorch_i3d_rgb_imagenet", "flow": "pytorch_i3d_flow_imagenet"},
    "charades": {"rgb": "pytorch_i3d_rgb_charades", "flow": "pytorch_i3d_flow_charades"},
    "reference": {"rgb": "i3d_rgb", "flow": "i3d_flow"},
}


@dataclasses.dataclass
class FinetuneOptions(TVL1Options):
    config: Optional[str] = option("YAML file with option values")
    model: str = option("the network to fine-tune (i3d)", choices=("i3d",))
    stream: str = option("rgb or flow", choices=("rgb", "flow"))
    weights: str = option("starting checkpoint family: imagenet (pytorch-i3d, Kinetics-400 from "
                          "ImageNet), charades (pytorch-i3d's Charades fine-tune) or reference "
                          "(the reference tool's); the result is saved in its layout",
                          choices=tuple(WEIGHTS))
    checkpoint_path: Optional[str] = option("explicit starting checkpoint (the weights family's "
                                            "layout; any class count)")
    allow_random_weights: bool = option("start from RANDOM weights (tests, smoke runs; logged loudly)")
    data_format: str = option("charades: Charades' annotation CSV (id, actions, length) with "
                              "videos under video_root; generic: CSV / JSON rows of video, label, "
                              "start, end", choices=("charades", "generic"))
    train_annotations: Optional[str] = option("annotation file of the training split")
    test_annotations: Optional[str] = option("annotation file of the evaluation split (none: no "
                                             "evaluation; the last checkpoint is also the best)")
    video_root: Optional[str] = option("folder of the inputs (charades: <id>.mp4 or frame folders "
                                       "<id>/; generic: relative paths; default: the file's folder)")
    num_classes: Optional[int] = option("classes of the new classifier; null: from the "
                                        "annotations (Charades: 157)", at_least=1)
    flow_source: str = option("flow stream: net (PWC-Net / RAFT / TV-L1 on the fly, as "
                              "extraction) or jpg "
                              "(x/y JPEG folders under flow_root: <stem>/<stem>-000001x.jpg)",
                              choices=("net", "jpg"))
    flow_type: str = option("pwc, raft or tvl1 (flow_source=net; tvl1_* options)",
                            choices=("pwc", "raft", "tvl1"))
    flow_checkpoint_path: Optional[str] = option("explicit PWC-Net / RAFT checkpoint")
    flow_root: Optional[str] = option("flow_source=jpg: folder of the x/y JPEG folders")
    fps: float = option("frame rate clips are taken at (frame folders and JPEG flow are "
                        "numbered at this rate)", above=0)
    clip_frames: int = option("frames per training clip", at_least=9)
    side_size: int = option("frames are resized so the shorter side is this (as extraction)",
                            at_least=16)
    crop_size: int = option("square crop fed to the network (random when training, centre when "
                            "evaluating)", at_least=16)
    batch_size: int = option("clips per forward pass (per process)", at_least=1)
    accumulate: int = option("forward passes whose gradients make one optimiser step", at_least=1)
    lr: float = option("SGD learning rate", above=0)
    momentum: float = option("SGD momentum", at_least=0)
    weight_decay: float = option("SGD weight decay", at_least=0)
    milestones: List[int] = option("optimiser steps at which the learning rate is multiplied by "
                                   "gamma (MultiStepLR)", at_least=0)
    gamma: float = option("learning-rate factor at each milestone", above=0)
    dropout: float = option("dropout before the classifier while training", at_least=0)
    bn_momentum: float = option("BatchNorm running-statistics momentum (pytorch-i3d: 0.01, right "
                                "for its thousands of steps; larger for short runs)", above=0)
    frame_loss_weight: float = option("weight of the per-frame BCE", at_least=0)
    video_loss_weight: float = option("weight of the BCE of the per-frame logits' maximum over time",
                                      at_least=0)
    max_steps: int = option("optimiser steps to train for", at_least=1)
    eval_every: int = option("optimiser steps between evaluations (and checkpoints)", at_least=1)
    eval_points: int = option("frames per video, evenly spaced, of the per-frame mAP (Charades: 25)",
                              at_least=1)
    max_eval_videos: Optional[int] = option("evaluate on at most this many test videos (null: all)",
                                            at_least=1)
    output_dir: str = option("where checkpoints, state and logs go")
    resume: bool = option("continue from output_dir/state.pt when it exists")
    device: str = option("auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    precision: str = option("fp32 or bf16 (autocast of the networks on GPUs)",
                            choices=("fp32", "bf16"))
    num_workers: Union[int, str] = option("data-loading processes (auto: CPU cores - 1, at most 8)")
    seed: int = option("seed of the data order, crops, flips and the new classifier")
    log_level: str = option("debug | info | warning | error",
                            choices=("debug", "info", "warning", "error"))
    progress: Union[bool, str] = option("progress bar (auto: on a terminal)",
                                        choices=("auto", True, False))


# -- options -----------------------------------------------------------------------------------
def parse_options(argv: list[str]) -> Config:
    """``finetune`` command line -> validated options: defaults (configs/finetune.yml) <- --config
    <- --flags <- key=value words, typed by the schema as the extraction command does."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    flags, words = _split_words(list(argv))
    fields = schema_fields(FinetuneOptions)
    defaults = read_yaml(CONFIG_FILE)
    parser = argparse.ArgumentParser(
        prog="video-features finetune", allow_abbrev=False,
        description="Fine-tune I3D on labelled videos (Charades' CSV or a generic CSV/JSON), then "
                    "extract with --feature_type i3d checkpoint_path_rgb=OUTPUT_DIR/best_rgb.pt")
    for key, (tp, f) in fields.items():
        default = defaults.get(key, f.default if f.default is not dataclasses.MISSING else None)
        _add_option(parser, key, tp, default, f.metadata["help"])
    ns = parse_flags(parser, flags)
    for key in words:
        if key not in fields:
            raise ConfigError(f"unknown option {key!r} for finetune{_did_you_mean(key, fields)} "
                              "(see finetune --help)")
    given = {k: _from_text(fields[k][0], v) for k, v in vars(ns).items()}
    file_values = read_yaml(given["config"]) if given.get("config") else {}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FinetuneOptions), defaults, file_values, given,
                                 {k: _from_text(fields[k][0], v) for k, v in words.items()})
        values = OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, "finetune") from None
    return validate(Config(values))


def validate(cfg: Config) -> Config:
    check_fields(cfg, FinetuneOptions)
    if not cfg.train_annotations:
        raise ConfigError("train_annotations is required: the annotation file of the training split")
    for key in ("train_annotations", "test_annotations"):
        if cfg.get(key) and not Path(cfg[key]).is_file():
            raise ConfigError(f"{key} {cfg[key]!r} is not a file")
    if cfg.data_format == "charades" and not cfg.video_root:
        raise ConfigError("data_format=charades needs video_root (the folder of <id>.mp4 files or "
                          "<id>/ frame folders)")
    if cfg.stream == "flow" and cfg.flow_source == "jpg" and not cfg.flow_root:
        raise ConfigError("flow_source=jpg needs flow_root (the folder of <stem>/ x/y JPEG folders)")
    if cfg.flow_type == "tvl1":
        if cfg.flow_checkpoint_path:
            raise ConfigError("option flow_checkpoint_path is for flow_type=pwc or raft: TV-L1 "
                              "has no weights")
        check_tvl1_options(cfg)
    if cfg.crop_size > cfg.side_size:
        raise ConfigError(f"crop_size {cfg.crop_size} is larger than side_size {cfg.side_size}")
    if cfg.frame_loss_weight + cfg.video_loss_weight <= 0:
        raise ConfigError("frame_loss_weight and video_loss_weight are both 0: nothing to learn")
    nw = cfg.num_workers
    if nw == "auto":
        cfg = cfg.replace(num_workers=max(0, min(8, (os.cpu_count() or 1) - 1)))
    elif isinstance(nw, bool) or not isinstance(nw, int) or nw < 0:
        raise ConfigError(f"option num_workers must be auto or an integer >= 0, got {nw!r}")
    if cfg.device == "auto":
        import torch

        cfg = cfg.replace(device="cuda" if torch.cuda.is_available() else "cpu")
    return cfg


def main(argv: list[str]) -> int:
    from video_features.utils.runner import configure_logging

    configure_logging("info")
    try:
        cfg = parse_options(argv)
        lead = os.environ.get("RANK", "0") == "0"   # under torchrun, one process reports
        configure_logging(cfg.log_level if lead else "warning")
        from video_features.finetune import train   # torch and the networks: after the options

        result = train(cfg)
    except FeatureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    if lead:
        print(json.dumps(result, default=str), file=sys.stderr)
    return 0
