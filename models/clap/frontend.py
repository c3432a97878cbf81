"""CLAP's log-mel front end in torch: transformers' ClapFeatureExtractor re-done on the device,
batched over windows.

The feature extractor is NumPy and works one clip at a time (a Python loop over STFT frames).
This module computes the same thing for a batch of equal-length windows: each window is padded
to the model's ``max_length_s`` (``repeatpad``: tiled a whole number of times, then zeros;
``repeat`` and ``pad`` as the extractor has them), reflect-padded by half an FFT, framed by a
periodic Hann window (1024 points, hop 480 at 48 kHz), turned into a power spectrum, projected
on the extractor's own mel filter bank (its ``mel_filters`` attribute, HTK scale, for
``truncation="fusion"``; ``mel_filters_slaney`` otherwise, as the extractor picks them) and
converted to dB (``10 log10(max(x, 1e-10))``). The extractor's ``top_db`` is stored but never
applied by it, so it is not applied here either.

Numbers are computed in float64 (as NumPy does) on CPUs and CUDA, then rounded to float32 like
the extractor's output. Fused models take the mel four times over (channels), as the extractor
stacks it for clips of at most ``max_length_s``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

PADDINGS = ("repeatpad", "repeat", "pad")
TRUNCATIONS = ("rand_trunc", "fusion")


class ClapLogMel(torch.nn.Module):
    """(B, S) windows of samples at the model's rate, S <= max samples -> (B, C, T, n_mels)
    float32 input features (C = 4 for ``truncation="fusion"``, else 1)."""

    def __init__(self, bank: np.ndarray, *, fft: int, hop: int, max_samples: int,
                 padding: str, fusion: bool, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding {padding!r} is not one of {', '.join(PADDINGS)}")
        self.fft, self.hop, self.max_samples = int(fft), int(hop), int(max_samples)
        self.padding, self.fusion, self.dtype = padding, bool(fusion), dtype
        # np.hanning(n + 1)[:-1]: transformers' periodic Hann window, the same float64 values
        self.register_buffer("window", torch.from_numpy(np.hanning(self.fft + 1)[:-1].copy()).to(dtype),
                             persistent=False)
        self.register_buffer("bank", torch.from_numpy(np.asarray(bank, np.float64).T.copy()).to(dtype),
                             persistent=False)          # (n_mels, n_bins)

    @classmethod
    def from_feature_extractor(cls, fe: Any, dtype: torch.dtype = torch.float64) -> "ClapLogMel":
        truncation = fe.truncation
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation {truncation!r} is not one of {', '.join(TRUNCATIONS)}")
        fusion = truncation == "fusion"
        bank = fe.mel_filters if fusion else fe.mel_filters_slaney
        return cls(bank, fft=fe.fft_window_size, hop=fe.hop_length, max_samples=fe.nb_max_samples,
                   padding=fe.padding, fusion=fusion, dtype=dtype)

    @property
    def frames(self) -> int:
        """STFT frames of one padded window (1001 for 10 s at 48 kHz)."""
        return 1 + self.max_samples // self.hop

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n) windows of n <= max samples -> (B, max samples), as the extractor pads a clip
        shorter than its max length (the same integer arithmetic)."""
        n = x.shape[-1]
        if n > self.max_samples:
            raise ValueError(f"a window of {n} samples is longer than the model's {self.max_samples}")
        if n == self.max_samples:
            return x
        if self.padding == "repeatpad":
            x = x.repeat(1, int(self.max_samples / n))
        elif self.padding == "repeat":
            x = x.repeat(1, int(self.max_samples / n) + 1)[:, :self.max_samples]
        return torch.nn.functional.pad(x, (0, self.max_samples - x.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.max_samples:
            x = self.pad(x)
        spec = torch.stft(x.to(self.dtype), self.fft, self.hop, self.fft, window=self.window,
                          center=True, pad_mode="reflect", onesided=True, return_complex=True)
        power = spec.real.square() + spec.imag.square()                    # (B, bins, T)
        mel = torch.matmul(self.bank, power).clamp_min(1e-10)              # (B, mels, T)
        db = (10.0 * torch.log10(mel)).transpose(1, 2).to(torch.float32)   # (B, T, mels)
        return db.unsqueeze(1).expand(-1, 4 if self.fusion else 1, -1, -1).contiguous()
