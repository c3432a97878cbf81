"""PWC-Net (Sun et al., CVPR 2018) in the variant of sniklaus/pytorch-pwc, in plain PyTorch.

The module tree mirrors that implementation so its published "network-default" checkpoint loads
with ``strict=True``: ``netExtractor.netOne.0.weight`` ... ``netSix``, the decoders ``netTwo`` ..
``netSix`` (each with ``netOne`` .. ``netSix`` and, below level 6, ``netUpflow``/``netUpfeat``)
and ``netRefiner.netMain.*``. The file as served (and the copy the reference tool
v-iashin/video_features shipped as ``pwc_net_sintel.pt``) spells every ``net`` as ``module``
(``moduleExtractor.moduleOne.0.weight``); :func:`models.flow_weights.convert_pwc_state_dict`
renames those keys.

The cost volume is the one of the original CUDA kernel: on a GPU one fused Triton kernel
(:mod:`models.pwc.correlation_triton`), elsewhere (and as the reference the kernel is tested
against) tensor ops (:func:`correlation_torch`).

Pre- and post-processing (:meth:`PWCNet.estimate`) follow what the reference tool did before
2024 (its ``models/pwc/pwc_src/pwc_net.py``, a wrapper of sniklaus/pytorch-pwc@f6138900):

* input RGB in [0, 255] -> channels reversed to **BGR**, divided by 255 (range [0, 1]);
* both frames resized (bilinear, ``align_corners=False``) to the next multiple of 64 of each side
  (``ceil(x / 64) * 64``; sizes that already are multiples are left alone);
* the network's quarter-resolution output is multiplied by **20.0**, resized (bilinear,
  ``align_corners=False``) back to the input size, and its x / y components are multiplied by
  ``W / W64`` and ``H / H64`` so the flow is in pixels of the input frame.

Warping uses ``grid_sample(..., align_corners=True)``: the reference ran PyTorch 1.2, whose
``grid_sample`` had the align-corners behaviour that later versions make explicit.
"""
from __future__ import annotations

import logging
import math
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: maximum displacement of the cost volume (in feature pixels); 81 = (2 * 4 + 1) ** 2 channels
MAX_DISPLACEMENT = 4
#: the network predicts flow divided by this factor
FLOW_SCALE = 20.0


def correlation(one: torch.Tensor, two: torch.Tensor,
                max_displacement: int = MAX_DISPLACEMENT) -> torch.Tensor:
    """The cost volume (:func:`correlation_torch`): the fused Triton kernel where it can run (CUDA
    tensors, Triton importable; ``VIDEO_FEATURES_CORRELATION=torch`` turns it off), tensor ops
    elsewhere.

    Triton finds a missing C compiler, ``Python.h`` or ``libcuda`` only when it first compiles and
    launches the kernel, not at import: a launch that raises turns the kernel off for the rest of
    the process (one warning) and this and every later call use tensor ops.
    """
    kernel = _fused_kernel()
    if (kernel is not None and kernel.available(one) and one.shape == two.shape
            and one.dim() == 4 and one.shape[1] <= kernel.MAX_CHANNELS):
        try:
            return kernel.correlation(one, two, max_displacement)
        except torch.cuda.OutOfMemoryError:
            raise  # the callers split batches on OOM; tensor ops would need more memory
        except Exception as exc:
            _disable_fused_kernel(kernel, exc)
    return correlation_torch(one, two, max_displacement)


_KERNEL: list = []
_KERNEL_LOCK = threading.Lock()


def _fused_kernel():
    """video_features.models.pwc.correlation_triton, or None without Triton (or when turned off); one log line."""
    if not _KERNEL:
        module = None
        if os.environ.get("VIDEO_FEATURES_CORRELATION", "auto") != "torch":
            try:
                from video_features.models.pwc import correlation_triton as module
            except Exception as exc:  # no Triton (or no GPU toolchain): tensor ops
                log.info("PWC-Net cost volume: tensor ops (fused kernel unavailable: %s)",
                         str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _KERNEL.append(module)
    return _KERNEL[0]


def _disable_fused_kernel(kernel, exc: Exception) -> None:
    """Tensor ops from now on; the lock keeps concurrent failures to one log line."""
    with _KERNEL_LOCK:
        if _KERNEL and _KERNEL[0] is kernel:
            _KERNEL[:] = [None]
            lines = str(exc).strip().splitlines()
            log.warning("PWC-Net cost volume: fused Triton kernel failed to launch (%s: %s); "
                        "using tensor ops for the rest of this process",
                        type(exc).__name__, lines[0] if lines else "")


def correlation_torch(one: torch.Tensor, two: torch.Tensor,
                      max_displacement: int = MAX_DISPLACEMENT) -> torch.Tensor:
    """Cost volume of the PWC-Net CUDA kernel: ``(B, C, H, W) x 2 -> (B, (2d+1)^2, H, W)``.

    ``out[b, k, y, x] = sum_c one[b, c, y, x] * two[b, c, y + dy, x + dx] / C`` with
    ``k = (dy + d) * (2d + 1) + (dx + d)`` (row-major over the vertical, then the horizontal
    displacement) and zeros outside ``two``. The division by the channel count is the kernel's
    ``total_sum / (float)sumelems``.

    One multiply-reduce per displacement over the whole batch: memory stays at the size of the
    inputs, whatever the number of displacements.
    """
    if one.shape != two.shape or one.dim() != 4:
        raise ValueError(f"correlation needs two equal (B, C, H, W) tensors, got "
                         f"{tuple(one.shape)} and {tuple(two.shape)}")
    b, c, h, w = one.shape
    d = max_displacement
    k = 2 * d + 1
    padded = F.pad(two, (d, d, d, d))
    out = one.new_empty((b, k * k, h, w))
    for dy in range(k):
        rows = padded[:, :, dy:dy + h, :]
        for dx in range(k):
            torch.sum(one * rows[:, :, :, dx:dx + w], dim=1, out=out[:, dy * k + dx])
    return out.div_(c)


def backwarp(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``features`` at ``p + flow(p)``; samples that touch the outside become zero.

    The validity test is the original one: a channel of ones is warped along and every pixel
    whose warped one is not above 0.999 is zeroed.
    """
    b, _, h, w = flow.shape
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=flow.dtype).view(1, 1, w)
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=flow.dtype).view(1, h, 1)
    gx = xs + flow[:, 0] / ((features.shape[3] - 1.0) / 2.0)
    gy = ys + flow[:, 1] / ((features.shape[2] - 1.0) / 2.0)
    grid = torch.stack((gx, gy), dim=3)
    ones = features.new_ones((b, 1, h, w))
    warped = F.grid_sample(torch.cat((features, ones), 1), grid, mode="bilinear",
                           padding_mode="zeros", align_corners=True)
    valid = (warped[:, -1:] > 0.999).to(warped.dtype)
    return warped[:, :-1] * valid


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=dilation, dilation=dilation)


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(negative_slope=0.1, inplace=False)


class _Extractor(nn.Module):
    """Six-level feature pyramid; each level halves the resolution (3 convs per level)."""

    WIDTHS = (3, 16, 32, 64, 96, 128, 196)
    NAMES = ("netOne", "netTwo", "netThr", "netFou", "netFiv", "netSix")

    def __init__(self) -> None:
        super().__init__()
        for name, cin, cout in zip(self.NAMES, self.WIDTHS[:-1], self.WIDTHS[1:]):
            setattr(self, name, nn.Sequential(
                _conv(cin, cout, stride=2), _lrelu(),
                _conv(cout, cout), _lrelu(),
                _conv(cout, cout), _lrelu(),
            ))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for name in self.NAMES:
            x = getattr(self, name)(x)
            levels.append(x)
        return levels


#: input channels of the decoder at each pyramid level: cost volume + features + flow + upfeat
_DECODER_IN = {6: 81, 5: 81 + 128 + 4, 4: 81 + 96 + 4, 3: 81 + 64 + 4, 2: 81 + 32 + 4}
#: factor from the upsampled flow (in units of the final flow / 20) to this level's pixels
_BACKWARP_SCALE = {5: 0.625, 4: 1.25, 3: 2.5, 2: 5.0}
#: the dense block: each conv's output is prepended to its input
_DENSE = (("netOne", 128), ("netTwo", 128), ("netThr", 96), ("netFou", 64), ("netFiv", 32))
_DENSE_OUT = sum(c for _, c in _DENSE)  # 448


class _Decoder(nn.Module):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        cin = _DECODER_IN[level]
        if level < 6:
            prev = _DECODER_IN[level + 1] + _DENSE_OUT
            self.netUpflow = nn.ConvTranspose2d(2, 2, kernel_size=4, stride=2, padding=1)
            self.netUpfeat = nn.ConvTranspose2d(prev, 2, kernel_size=4, stride=2, padding=1)
            self.backwarp_scale = _BACKWARP_SCALE[level]
        width = cin
        for name, cout in _DENSE:
            setattr(self, name, nn.Sequential(_conv(width, cout), _lrelu()))
            width += cout
        self.netSix = nn.Sequential(_conv(width, 2))

    def forward(self, one: torch.Tensor, two: torch.Tensor,
                previous: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if previous is None:
            feat = F.leaky_relu(correlation(one, two), 0.1)
        else:
            prev_flow, prev_feat = previous
            flow = self.netUpflow(prev_flow)
            upfeat = self.netUpfeat(prev_feat)
            volume = F.leaky_relu(correlation(one, backwarp(two, flow * self.backwarp_scale)), 0.1)
            feat = torch.cat((volume, one, flow, upfeat), 1)
        for name, _ in _DENSE:
            feat = torch.cat((getattr(self, name)(feat), feat), 1)
        return self.netSix(feat), feat


class _Refiner(nn.Module):
    """Context network: dilated convs (1, 2, 4, 8, 16, 1, 1) on the level-2 decoder features."""

    def __init__(self) -> None:
        super().__init__()
        spec = ((_DECODER_IN[2] + _DENSE_OUT, 128, 1), (128, 128, 2), (128, 128, 4), (128, 96, 8),
                (96, 64, 16), (64, 32, 1))
        layers: list[nn.Module] = []
        for cin, cout, dil in spec:
            layers += [_conv(cin, cout, dilation=dil), _lrelu()]
        layers.append(_conv(32, 2))
        self.netMain = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.netMain(x)


class PWCNet(nn.Module):
    """PWC-Net; :meth:`estimate` is the entry point for frames, :meth:`forward` for raw tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.netExtractor = _Extractor()
        self.netTwo = _Decoder(2)
        self.netThr = _Decoder(3)
        self.netFou = _Decoder(4)
        self.netFiv = _Decoder(5)
        self.netSix = _Decoder(6)
        self.netRefiner = _Refiner()

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        """Flow from preprocessed frames at a quarter of their resolution.

        ``img1``/``img2``: (B, 3, H, W), BGR in [0, 1], H and W multiples of 64. Returns
        (B, 2, H / 4, W / 4) already multiplied by :data:`FLOW_SCALE`, i.e. in pixels of the
        (H, W) frames.
        """
        b = img1.shape[0]
        pyramid = self.netExtractor(torch.cat((img1, img2), 0))  # one pass for both frames
        ones = [p[:b] for p in pyramid]
        twos = [p[b:] for p in pyramid]
        estimate = None
        for idx, decoder in ((5, self.netSix), (4, self.netFiv), (3, self.netFou),
                             (2, self.netThr), (1, self.netTwo)):
            estimate = decoder(ones[idx], twos[idx], estimate)
        flow, feat = estimate
        return (flow + self.netRefiner(feat)) * FLOW_SCALE

    @staticmethod
    def preprocessed_size(height: int, width: int) -> tuple[int, int]:
        """The size the frames are resized to: each side rounded up to a multiple of 64."""
        return (int(math.floor(math.ceil(height / 64.0) * 64.0)),
                int(math.floor(math.ceil(width / 64.0) * 64.0)))

    @torch.no_grad()
    def estimate(self, frames1: torch.Tensor, frames2: torch.Tensor) -> torch.Tensor:
        """Flow from ``frames1`` to ``frames2``: (B, 2, H, W) float32, in pixels.

        ``frames1``/``frames2``: float (B, 3, H, W) RGB in [0, 255] on the model's device. Any
        number of pairs at once; each pair's result does not depend on the others.
        """
        if frames1.shape != frames2.shape or frames1.dim() != 4 or frames1.shape[1] != 3:
            raise ValueError(f"estimate needs two equal (B, 3, H, W) tensors, got "
                             f"{tuple(frames1.shape)} and {tuple(frames2.shape)}")
        dtype = next(self.parameters()).dtype
        b, _, h, w = frames1.shape
        hp, wp = self.preprocessed_size(h, w)
        # RGB -> BGR; flip, not a list index (a list index is a blocking host-to-device copy)
        x = torch.cat((frames1, frames2), 0).flip(1).to(dtype) / 255.0
        if (hp, wp) != (h, w):
            x = F.interpolate(x, size=(hp, wp), mode="bilinear", align_corners=False)
        flow = self(x[:b], x[b:])
        flow = F.interpolate(flow.float(), size=(h, w), mode="bilinear", align_corners=False)
        flow[:, 0] *= float(w) / float(wp)
        flow[:, 1] *= float(h) / float(hp)
        return flow
