"""Checkpoints of the optical-flow networks (PWC-Net, RAFT): cards, key conversion, loading.

Both loaders go the one way every checkpoint goes here (:mod:`utils.weights`): explicit path ->
torch hub cache -> verified download -> an error naming the URL. Keys are converted from the
published layout and loaded strictly, so a checkpoint that does not fit fails loudly.
:func:`write_random_checkpoint` writes random weights in the published layouts, so tests and
benchmarks exercise the real loading path.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from video_features.models.pwc.net import PWCNet
from video_features.models.raft.net import RAFT
from video_features.utils.weights import WeightCard, load_checkpoint_into, register_card, use_random_weights

log = logging.getLogger(__name__)

# sha256: no digest of this file is published by its author. One third-party record (a
# compatibility layer for FloLPIPS, which downloads this same URL) pins a copy at
# ad2dc62b63b9d10ad42a6969179b3f996d4115e2ec6421bf532f99cf278ffcd2; a single unverified record
# is not enough to refuse downloads over, so it is kept in ``extra`` as a hint and the card
# holds no digest (the download is then accepted as served).
PWC_CARD = register_card(WeightCard(
    name="pwc-network-default",
    url="http://content.sniklaus.com/github/pytorch-pwc/network-default.pytorch",
    sha256="",
    # the torch hub file name sniklaus/pytorch-pwc's own run.py caches this URL under
    filename="pwc-default",
    layout=("sniklaus/pytorch-pwc 'default' (Sintel fine-tuned) state dict, 126 tensors, keys "
            "spelt 'moduleExtractor.moduleOne.0.weight', 'moduleSix.moduleUpflow...', "
            "'moduleRefiner.moduleMain.12.bias'; current sniklaus code (and this network) spells "
            "them 'netExtractor.netOne.0.weight' etc. Both are accepted."),
    preprocessing=("RGB [0,255] -> BGR / 255; bilinear (align_corners=False) resize of each "
                   "side to ceil(x/64)*64; output x 20, bilinear resize back, x W/W64 and "
                   "y H/H64"),
    extra={
        "unverified_sha256": "ad2dc62b63b9d10ad42a6969179b3f996d4115e2ec6421bf532f99cf278ffcd2",
        # the copy the reference tool shipped in its repository (old 'module*' key spelling)
        "reference_copy": ("https://github.com/v-iashin/video_features/raw/"
                           "bd827df5e543ef3270946bcf63e47e18abcdd9ab/models/pwc/checkpoints/"
                           "pwc_net_sintel.pt"),
    },
))

# sha256 of raft-sintel.pth as extracted from the official models.zip of princeton-vl/RAFT
# (download_models.sh); recorded identically by two independent third-party projects that
# audited their copies against that zip. The reference tool ships a file of the same name in
# its repository (committed 2020-10-07, unchanged since) and reads it from there; that this copy
# is byte-identical to the official one could not be checked here. Should it differ, the download
# stops with both digests and the file can be taken from the official archive in ``extra``.
RAFT_CARD = register_card(WeightCard(
    name="raft-sintel",
    url=("https://github.com/v-iashin/video_features/raw/"
         "a2f61b7a4cf0ca6a2d91dcc2182f57e7cfd12664/models/raft/checkpoints/raft-sintel.pth"),
    sha256="90630d2e7d488a0d3ccb5e8194524850c4c05c732ea4ff99799822c7fa5c5cbf",
    filename="raft-sintel.pth",
    layout=("princeton-vl/RAFT full model saved from DataParallel: every key prefixed 'module.' "
            "('module.fnet.conv1.weight', 'module.cnet.layer2.0.norm3.running_mean', "
            "'module.update_block.mask.2.bias'); 5,257,536 parameters"),
    preprocessing=("RGB [0,255], replicate pad to multiples of 8 (split as InputPadder "
                   "'sintel'), 2*(x/255)-1, 20 iterations, convex upsampling"),
    extra={"official_archive": "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip"},
))


# RAFT fine-tuned on KITTI-2015, the reference tool's raft-kitti.pth (shipped beside
# raft-sintel.pth in its repository, from the same official models.zip). No digest of it is
# recorded by anyone we could check, so the card holds none (the download is accepted as
# served) and names the official archive.
RAFT_KITTI_CARD = register_card(WeightCard(
    name="raft-kitti",
    url=("https://github.com/v-iashin/video_features/raw/"
         "a2f61b7a4cf0ca6a2d91dcc2182f57e7cfd12664/models/raft/checkpoints/raft-kitti.pth"),
    sha256="",
    filename="raft-kitti.pth",
    layout=RAFT_CARD.layout,
    preprocessing=RAFT_CARD.preprocessing,
    extra={"official_archive": RAFT_CARD.extra["official_archive"]},
))
RAFT_CARDS = {"sintel": RAFT_CARD, "kitti": RAFT_KITTI_CARD}


def raft_card(finetuned_on: str = "sintel") -> WeightCard:
    """The RAFT checkpoint fine-tuned on ``sintel`` or ``kitti``."""
    try:
        return RAFT_CARDS[finetuned_on]
    except KeyError:
        raise ValueError(f"finetuned_on must be one of {', '.join(RAFT_CARDS)}, "
                         f"got {finetuned_on!r}") from None


def convert_pwc_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published PWC-Net keys -> :class:`PWCNet` keys.

    Accepts the old spelling (``moduleExtractor.moduleOne.0.weight``), the new one
    (``netExtractor.netOne.0.weight``), and either wrapped in a DataParallel ``module.`` prefix.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        parts = [("net" + p[len("module"):]) if p.startswith("module") else p
                 for p in key.split(".")]
        out[".".join(parts)] = value
    return out


def convert_raft_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published RAFT keys (``module.fnet...``) -> :class:`RAFT` keys; unprefixed keys pass."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _load(make: Any, card: WeightCard, convert, checkpoint_path: str | None,
          allow_random: bool, device: torch.device | str) -> torch.nn.Module:
    if use_random_weights(allow_random, checkpoint_path, card.name):
        # seeded, so that every run and every worker has the same random network
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = make()
    else:
        model = make()
        load_checkpoint_into(model, card, checkpoint_path, convert, fill_bn_counters=True)
    return model.to(device).eval()


def load_pwc(checkpoint_path: str | None = None, allow_random: bool = False,
             device: torch.device | str = "cpu") -> PWCNet:
    """PWC-Net with the "network-default" weights, in eval mode on ``device``.

    ``checkpoint_path`` wins when given; otherwise the cache / download of :data:`PWC_CARD`.
    ``allow_random=True`` without a path skips the weights (random init, loud warning).
    """
    return _load(PWCNet, PWC_CARD, convert_pwc_state_dict, checkpoint_path, allow_random,
                 device)


def load_raft(checkpoint_path: str | None = None, allow_random: bool = False,
              device: torch.device | str = "cpu", finetuned_on: str = "sintel") -> RAFT:
    """RAFT with the raft-sintel (or raft-kitti) weights, in eval mode on ``device`` (same
    rules as :func:`load_pwc`)."""
    return _load(RAFT, raft_card(finetuned_on), convert_raft_state_dict, checkpoint_path,
                 allow_random, device)


def load_flow_net(cfg: Any, allow_random: bool, device: Any) -> Any:
    """The optical-flow estimator ``cfg.flow_type`` names (tvl1, pwc or raft) on ``device``, for
    i3d's flow stream and fine-tuning on computed flow."""
    if cfg.flow_type == "tvl1":
        from video_features.models.tvl1 import TVL1, TVL1Params

        return TVL1(TVL1Params.from_config(cfg)).to(device)
    load = load_pwc if cfg.flow_type == "pwc" else load_raft
    return load(cfg.flow_checkpoint_path, allow_random, device)


def estimate_flow(net: Any, cfg: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flow from frames ``a`` to ``b`` with ``cfg``'s RAFT options where they apply (iterations
    and padding; without them RAFT's defaults, 20 and unpad)."""
    if cfg.flow_type != "raft":
        return net.estimate(a, b)
    return net.estimate(a, b, iters=cfg.get("raft_iters", 20),
                        unpad=cfg.get("raft_padding", "unpad") == "unpad")


def _official_state(kind: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    if kind in ("pwc", PWC_CARD.name):
        # the spelling of the file as served: every 'net' component written 'module'
        state = PWCNet().state_dict()
        return {".".join(("module" + p[len("net"):]) if p.startswith("net") else p
                         for p in k.split(".")): v.clone() for k, v in state.items()}
    if kind in ("raft", RAFT_CARD.name, RAFT_KITTI_CARD.name):
        model = RAFT()
        with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model has
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        return {"module." + k: v.clone() for k, v in model.state_dict().items()}
    raise ValueError(f"unknown flow checkpoint kind {kind!r}; use 'pwc' or 'raft'")


def write_random_checkpoint(path: str | os.PathLike, kind: str, seed: int = 0) -> Path:
    """Write random weights for ``kind`` ('pwc' or 'raft') in the published key layout and
    shapes (PWC: ``moduleExtractor...``; RAFT: ``module.fnet...``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_official_state(kind, seed), path)
    return path
