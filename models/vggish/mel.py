"""VGGish's log-mel front end in torch: 16 kHz waveform -> ``(E, 96, 64)`` examples on the device.

Same numbers as the original NumPy code (tensorflow/models research/audioset/vggish:
``mel_features.py``, ``vggish_params.py``, ``vggish_input.py``):

* frames of 400 samples (25 ms) every 160 samples (10 ms), no padding, incomplete frames dropped;
* periodic Hann window ``0.5 - 0.5 cos(2 pi n / 400)``; magnitude of a 512-point real FFT;
* 64 triangular mel bands between 125 and 7500 Hz on the HTK mel scale
  ``1127 ln(1 + f / 700)``, spaced evenly in mel, triangles evaluated at the FFT bin centres
  ``linspace(0, 8000, 257)``; the DC bin gets weight 0;
* ``log(mel + 0.01)``;
* non-overlapping examples of 96 frames (0.96 s); a trailing partial example is dropped.

Computed in float64 by default (as NumPy does) and handed to the network as float32, so the
result matches the reference to ~1e-12; ``dtype=torch.float32`` is available for devices without
float64 support. Examples are independent given their 15,600 input samples, so a long waveform
is processed a batch of examples at a time without changing any value.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
WINDOW_SECONDS = 0.025
HOP_SECONDS = 0.010
NUM_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_SECONDS = 0.96

WINDOW = int(round(SAMPLE_RATE * WINDOW_SECONDS))             # 400 samples
HOP = int(round(SAMPLE_RATE * HOP_SECONDS))                   # 160 samples
FFT_SIZE = 2 ** int(math.ceil(math.log(WINDOW) / math.log(2.0)))  # 512
NUM_BINS = FFT_SIZE // 2 + 1                                  # 257
EXAMPLE_FRAMES = int(round(EXAMPLE_SECONDS / HOP_SECONDS))    # 96
EXAMPLE_HOP = EXAMPLE_FRAMES * HOP                            # 15,360 samples between examples
EXAMPLE_SPAN = (EXAMPLE_FRAMES - 1) * HOP + WINDOW            # 15,600 samples feed one example

_MEL_BREAK_HZ = 700.0
_MEL_Q = 1127.0


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return _MEL_Q * np.log(1.0 + np.asarray(hz, dtype=np.float64) / _MEL_BREAK_HZ)


def mel_weight_matrix(num_bands: int = NUM_BANDS, num_bins: int = NUM_BINS,
                      sample_rate: int = SAMPLE_RATE, low_hz: float = MEL_MIN_HZ,
                      high_hz: float = MEL_MAX_HZ) -> np.ndarray:
    """``(num_bins, num_bands)`` float64 matrix M with ``mel = |STFT| @ M``."""
    nyquist = sample_rate / 2.0
    if not 0.0 <= low_hz < high_hz <= nyquist:
        raise ValueError(f"mel band edges must satisfy 0 <= {low_hz} < {high_hz} <= {nyquist}")
    bin_mel = hz_to_mel(np.linspace(0.0, nyquist, num_bins))[:, None]
    edges = np.linspace(hz_to_mel(low_hz), hz_to_mel(high_hz), num_bands + 2)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel - lo) / (mid - lo)
    falling = (hi - bin_mel) / (hi - mid)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def periodic_hann(length: int = WINDOW) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi / length * np.arange(length))


def num_examples(num_samples: int, hop_frames: int = EXAMPLE_FRAMES) -> int:
    """How many complete 0.96 s examples, ``hop_frames`` log-mel frames (10 ms each) apart, a
    16 kHz waveform of ``num_samples`` yields."""
    if num_samples < EXAMPLE_SPAN:
        return 0
    return (num_samples - EXAMPLE_SPAN) // (hop_frames * HOP) + 1


def samples_for(n_examples: int, hop_frames: int = EXAMPLE_FRAMES) -> int:
    """Waveform samples that examples ``[0, n_examples)`` read."""
    return 0 if n_examples <= 0 else (n_examples - 1) * hop_frames * HOP + EXAMPLE_SPAN


class LogMelExamples(nn.Module):
    """``forward(waveform (N,)) -> (E, 96, 64)`` float32 log-mel examples, on the waveform's device."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.compute_dtype = dtype
        self.register_buffer("window", torch.from_numpy(periodic_hann()).to(dtype), persistent=False)
        self.register_buffer("mel_matrix", torch.from_numpy(mel_weight_matrix()).to(dtype),
                             persistent=False)

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor, hop_frames: int = EXAMPLE_FRAMES) -> torch.Tensor:
        """The examples of ``waveform``: 96 log-mel frames each, ``hop_frames`` apart (96: the
        original non-overlapping 0.96 s examples)."""
        if waveform.dim() != 1:
            raise ValueError(f"expected a 1-D waveform, got shape {tuple(waveform.shape)}")
        n = num_examples(waveform.shape[0], hop_frames)
        if n == 0:
            return waveform.new_zeros((0, EXAMPLE_FRAMES, NUM_BANDS), dtype=torch.float32)
        x = waveform[:samples_for(n, hop_frames)].to(device=self.window.device,
                                                     dtype=self.compute_dtype)
        frames = x.unfold(0, WINDOW, HOP)                      # (F, 400), a view
        spec = torch.fft.rfft(frames * self.window, n=FFT_SIZE).abs()
        logmel = torch.log(spec @ self.mel_matrix + LOG_OFFSET)  # (F, 64)
        if hop_frames == EXAMPLE_FRAMES:
            return logmel.reshape(n, EXAMPLE_FRAMES, NUM_BANDS).to(torch.float32)
        # examples framed over the log-mel frames, as the original code frames them
        return logmel.unfold(0, EXAMPLE_FRAMES, hop_frames).transpose(1, 2).to(torch.float32)
