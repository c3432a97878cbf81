"""RAFT (Teed & Deng, ECCV 2020), the full model of princeton-vl/RAFT, in plain PyTorch.

The module tree mirrors the official one so ``raft-sintel.pth`` loads with ``strict=True`` once
its DataParallel prefix ``module.`` is stripped (``fnet.*``, ``cnet.*``, ``update_block.*``;
see :func:`models.flow_weights.convert_raft_state_dict`).

What :meth:`RAFT.estimate` does is what the reference tool (v-iashin/video_features, following
the official ``demo.py``) does:

* RGB in [0, 255]; each side replicate-padded to a multiple of 8, the pad split as the official
  ``InputPadder`` in its default ("sintel") mode does: ``left = pad_w // 2``,
  ``right = pad_w - left``, ``top = pad_h // 2``, ``bottom = pad_h - top``;
* inside the network the frames become ``2 * (x / 255) - 1``;
* 20 refinement iterations; the flow is upsampled from 1/8 resolution by the learnt convex
  combination of the last iteration (``test_mode=True``).

``unpad=True`` crops the padding away again and returns the flow at the input size (correct).
``unpad=False`` returns the padded field: this is what the reference tool's I3D flow stream
passes on to its centre crop, so its crop sees a field shifted by the top/left pad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CORR_LEVELS = 4
CORR_RADIUS = 4
HIDDEN_DIM = 128
CONTEXT_DIM = 128


# --------------------------------------------------------------------------------------------
# encoders


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # affine=False: no parameters in the checkpoint
    if kind == "none":
        return nn.Sequential()
    raise ValueError(f"unknown norm {kind!r}")


class ResidualBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, norm_fn: str, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.norm1 = _norm(norm_fn, planes)
        self.norm2 = _norm(norm_fn, planes)
        if stride == 1:
            self.downsample = None
        else:
            # the same norm module is reachable as ``norm3`` and ``downsample.1``: the official
            # checkpoints carry both key spellings
            self.norm3 = _norm(norm_fn, planes)
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride), self.norm3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return self.relu(x + y)


class BasicEncoder(nn.Module):
    """7x7/2 conv, three residual stages (64, 96/2, 128/2), 1x1 output conv: 1/8 resolution."""

    def __init__(self, output_dim: int, norm_fn: str) -> None:
        super().__init__()
        self.norm1 = _norm(norm_fn, 64)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.relu1 = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(ResidualBlock(64, 64, norm_fn, 1),
                                    ResidualBlock(64, 64, norm_fn, 1))
        self.layer2 = nn.Sequential(ResidualBlock(64, 96, norm_fn, 2),
                                    ResidualBlock(96, 96, norm_fn, 1))
        self.layer3 = nn.Sequential(ResidualBlock(96, 128, norm_fn, 2),
                                    ResidualBlock(128, 128, norm_fn, 1))
        self.conv2 = nn.Conv2d(128, output_dim, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.conv2(x)


# --------------------------------------------------------------------------------------------
# update operator


class BasicMotionEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cor_planes = CORR_LEVELS * (2 * CORR_RADIUS + 1) ** 2
        self.convc1 = nn.Conv2d(cor_planes, 256, 1, padding=0)
        self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
        self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
        self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
        self.conv = nn.Conv2d(64 + 192, 128 - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        cor = F.relu(self.convc2(F.relu(self.convc1(corr))))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        out = F.relu(self.conv(torch.cat((cor, flo), 1)))
        return torch.cat((out, flow), 1)


class SepConvGRU(nn.Module):
    """A ConvGRU with a 1x5 pass followed by a 5x1 pass."""

    def __init__(self, hidden_dim: int = HIDDEN_DIM, input_dim: int = 128 + HIDDEN_DIM) -> None:
        super().__init__()
        c = hidden_dim + input_dim
        self.convz1 = nn.Conv2d(c, hidden_dim, (1, 5), padding=(0, 2))
        self.convr1 = nn.Conv2d(c, hidden_dim, (1, 5), padding=(0, 2))
        self.convq1 = nn.Conv2d(c, hidden_dim, (1, 5), padding=(0, 2))
        self.convz2 = nn.Conv2d(c, hidden_dim, (5, 1), padding=(2, 0))
        self.convr2 = nn.Conv2d(c, hidden_dim, (5, 1), padding=(2, 0))
        self.convq2 = nn.Conv2d(c, hidden_dim, (5, 1), padding=(2, 0))

    @staticmethod
    def _step(h: torch.Tensor, x: torch.Tensor, convz: nn.Conv2d, convr: nn.Conv2d,
              convq: nn.Conv2d) -> torch.Tensor:
        hx = torch.cat((h, x), 1)
        z = torch.sigmoid(convz(hx))
        r = torch.sigmoid(convr(hx))
        q = torch.tanh(convq(torch.cat((r * h, x), 1)))
        return (1 - z) * h + z * q

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self._step(h, x, self.convz1, self.convr1, self.convq1)
        return self._step(h, x, self.convz2, self.convr2, self.convq2)


class FlowHead(nn.Module):
    def __init__(self, input_dim: int = HIDDEN_DIM, hidden_dim: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(input_dim, hidden_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden_dim, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.conv1(x)))


class BasicUpdateBlock(nn.Module):
    def __init__(self, hidden_dim: int = HIDDEN_DIM) -> None:
        super().__init__()
        self.encoder = BasicMotionEncoder()
        self.gru = SepConvGRU(hidden_dim=hidden_dim, input_dim=128 + hidden_dim)
        self.flow_head = FlowHead(hidden_dim, hidden_dim=256)
        self.mask = nn.Sequential(
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 64 * 9, 1, padding=0))

    def forward(self, net: torch.Tensor, inp: torch.Tensor, corr: torch.Tensor,
                flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One refinement step: new hidden state and the flow update (the mask is separate)."""
        motion = self.encoder(flow, corr)
        net = self.gru(net, torch.cat((inp, motion), 1))
        return net, self.flow_head(net)

    def upsample_mask(self, net: torch.Tensor) -> torch.Tensor:
        # the 0.25 is the official "scale mask to balance gradients"
        return 0.25 * self.mask(net)


# --------------------------------------------------------------------------------------------
# correlation


def coords_grid(batch: int, height: int, width: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 2, H, W) pixel coordinates; channel 0 is x (column), channel 1 is y (row)."""
    ys = torch.arange(height, device=device, dtype=dtype).view(height, 1).expand(height, width)
    xs = torch.arange(width, device=device, dtype=dtype).view(1, width).expand(height, width)
    return torch.stack((xs, ys), 0).unsqueeze(0).repeat(batch, 1, 1, 1)


def sample_pixels(img: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling of ``img`` (N, C, H, W) at pixel coordinates ``coords`` (N, h, w, 2 = x, y),
    zeros outside: the official ``bilinear_sampler`` (``grid_sample`` with ``align_corners=True``
    on ``2 x / (W - 1) - 1``).

    A side of length 1 (only at the coarsest pyramid level of tiny frames) would divide by zero
    there; it is mapped with the equivalent ``align_corners=False`` form instead.
    """
    h, w = img.shape[-2:]
    x, y = coords[..., 0], coords[..., 1]
    if w > 1 and h > 1:
        grid = torch.stack((2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1), -1)
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), -1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class CorrPyramid:
    """All-pairs correlation volume and its average-pooled pyramid, looked up around ``coords``.

    Level 0 holds ``<f1(p), f2(q)> / sqrt(C)`` for every pixel pair of the 1/8-resolution
    feature maps as (B*H*W, 1, H, W); level i is level 0 average-pooled 2^i times (floor).
    """

    def __init__(self, fmap1: torch.Tensor, fmap2: torch.Tensor, num_levels: int = CORR_LEVELS,
                 radius: int = CORR_RADIUS) -> None:
        b, c, h, w = fmap1.shape
        self.radius = radius
        corr = torch.bmm(fmap1.reshape(b, c, h * w).transpose(1, 2), fmap2.reshape(b, c, h * w))
        corr = corr.reshape(b * h * w, 1, h, w) / torch.sqrt(torch.tensor(float(c)))
        self.levels = [corr]
        for _ in range(num_levels - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            self.levels.append(corr)
        r = radius
        d = torch.arange(-r, r + 1, device=fmap1.device, dtype=fmap1.dtype)
        # Offsets as the official lookup builds them: stack(meshgrid(dy, dx)) is *added to (x, y)*,
        # so the first window axis moves x and the second moves y. The 81 channels of a level are
        # therefore ordered ``k = (ox + r) * (2r + 1) + (oy + r)``; the trained weights expect it.
        self.delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1).view(1, 2 * r + 1,
                                                                              2 * r + 1, 2)

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords`` (B, 2, H, W) -> (B, levels * (2r+1)^2, H, W)."""
        b, _, h, w = coords.shape
        centre = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2)
        out = []
        for i, corr in enumerate(self.levels):
            sampled = sample_pixels(corr, centre / 2 ** i + self.delta)
            out.append(sampled.view(b, h, w, -1))
        return torch.cat(out, -1).permute(0, 3, 1, 2).contiguous().float()


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) flow at 1/8 -> (B, 2, 8H, 8W): each fine pixel is a softmax-weighted
    combination of the 3x3 coarse neighbourhood (zero padded) of its coarse pixel, times 8."""
    n, _, h, w = flow.shape
    weights = torch.softmax(mask.view(n, 1, 9, 8, 8, h, w), dim=2)
    neigh = F.unfold(8 * flow, [3, 3], padding=1).view(n, 2, 9, 1, 1, h, w)
    up = torch.sum(weights * neigh, dim=2)  # (n, 2, 8, 8, h, w)
    return up.permute(0, 1, 4, 2, 5, 3).reshape(n, 2, 8 * h, 8 * w)


# --------------------------------------------------------------------------------------------
# the network


def pad_amounts(height: int, width: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) replicate padding to multiples of 8, split as the official
    ``InputPadder`` (mode "sintel") does."""
    pad_h = (((height // 8) + 1) * 8 - height) % 8
    pad_w = (((width // 8) + 1) * 8 - width) % 8
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


class RAFT(nn.Module):
    """RAFT (full model); :meth:`estimate` is the entry point for frames."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_dim = HIDDEN_DIM
        self.context_dim = CONTEXT_DIM
        self.fnet = BasicEncoder(output_dim=256, norm_fn="instance")
        self.cnet = BasicEncoder(output_dim=HIDDEN_DIM + CONTEXT_DIM, norm_fn="batch")
        self.update_block = BasicUpdateBlock(hidden_dim=HIDDEN_DIM)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int = 20) -> torch.Tensor:
        """Flow at full resolution from normalised frames.

        ``image1``/``image2``: (B, 3, H, W) RGB in [-1, 1], H and W multiples of 8.
        Returns (B, 2, H, W): the convex-upsampled flow after ``iters`` updates.
        """
        if iters < 1:
            raise ValueError("iters must be at least 1")
        b = image1.shape[0]
        fmaps = self.fnet(torch.cat((image1, image2), 0)).float()  # instance norm: per sample
        corr_fn = CorrPyramid(fmaps[:b], fmaps[b:])
        net, inp = torch.split(self.cnet(image1), [self.hidden_dim, self.context_dim], dim=1)
        net = torch.tanh(net)
        inp = torch.relu(inp)

        _, _, h8, w8 = fmaps.shape
        coords0 = coords_grid(b, h8, w8, image1.device)
        coords1 = coords0.clone()
        dtype = net.dtype  # coordinates stay float32 when the network runs in half precision
        for _ in range(iters):
            corr = corr_fn(coords1).to(dtype)
            net, delta = self.update_block(net, inp, corr, (coords1 - coords0).to(dtype))
            coords1 = coords1 + delta.float()
        # only the last iteration's upsampled flow is returned, so only it is upsampled
        mask = self.update_block.upsample_mask(net).float()
        return convex_upsample(coords1 - coords0, mask)

    @torch.no_grad()
    def estimate(self, frames1: torch.Tensor, frames2: torch.Tensor, iters: int = 20,
                 unpad: bool = True) -> torch.Tensor:
        """Flow from ``frames1`` to ``frames2`` in pixels, float32.

        ``frames1``/``frames2``: float (B, 3, H, W) RGB in [0, 255] on the model's device; any
        number of pairs at once. Returns (B, 2, H, W) with ``unpad=True``; with ``unpad=False``
        the field on the replicate-padded frames, (B, 2, H8, W8) with H8, W8 the multiples of 8
        (the reference tool's behaviour, see the module docstring).

        Memory: the all-pairs volume holds ``(H8 * W8 / 64) ** 2`` floats per pair (7.6 MB at
        256x344, 4.2 GB at 1080x1920), so callers pick the number of pairs per call by size.
        """
        if frames1.shape != frames2.shape or frames1.dim() != 4 or frames1.shape[1] != 3:
            raise ValueError(f"estimate needs two equal (B, 3, H, W) tensors, got "
                             f"{tuple(frames1.shape)} and {tuple(frames2.shape)}")
        dtype = next(self.parameters()).dtype
        b, _, h, w = frames1.shape
        left, right, top, bottom = pad_amounts(h, w)
        x = torch.cat((frames1, frames2), 0).to(dtype)
        if left or right or top or bottom:
            x = F.pad(x, [left, right, top, bottom], mode="replicate")
        x = 2 * (x / 255.0) - 1.0
        flow = self(x[:b].contiguous(), x[b:].contiguous(), iters=iters).float()
        if unpad:
            flow = flow[:, :, top:top + h, left:left + w]
        return flow
