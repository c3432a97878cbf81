"""The VGGish network (AudioSet) and the AudioSet PCA/quantisation post-processor.

Module layout and parameter names follow the public PyTorch port's checkpoint
(``features.{0,3,6,8,11,13}``, ``embeddings.{0,2,4}``), so that file loads strictly. The layers
are those of the original TF-Slim model (``vggish_slim.py``): 3x3 convolutions (SAME padding)
with 64, 128, 256, 256, 512, 512 channels, 2x2/2 max pools after the 1st, 2nd, 4th and 6th,
flattening in TF's NHWC order (6 x 4 x 512 = 12288), fully connected 4096, 4096, 128.
"""
from __future__ import annotations

import torch
from torch import nn

EMBEDDING_SIZE = 128
QUANTIZE_MIN = -2.0
QUANTIZE_MAX = 2.0

#: conv channel plan; "M" is a 2x2 max pool
_PLAN = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")


def _features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 1
    for v in _PLAN:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = int(v)
    return nn.Sequential(*layers)


class VGGish(nn.Module):
    """``(B, 96, 64)`` (or ``(B, 1, 96, 64)``) log-mel examples -> ``(B, 128)`` embeddings.

    ``forward`` returns the embedding after the final ReLU, which is what the reference tool and
    the PyTorch port emit. ``pre_activation=True`` returns the fc2 output before that ReLU, the
    tensor the current official TensorFlow code names ``vggish/embedding`` and post-processes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _features()
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING_SIZE), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, pre_activation: bool = False) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = self.features(x)                                 # (B, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)    # TF's NHWC flattening
        x = self.embeddings[:5](x)
        return x if pre_activation else torch.relu(x)


class PCAQuantizer(nn.Module):
    """AudioSet's release post-processing: PCA with whitening, clip to [-2, 2], 8-bit quantise.

    Mirrors the official ``vggish_postprocess.Postprocessor`` (float64 arithmetic; the 8-bit
    value is truncated, as its ``astype(np.uint8)`` does). Returns uint8 values in a tensor.
    """

    def __init__(self, eigen_vectors: torch.Tensor | None = None,
                 means: torch.Tensor | None = None) -> None:
        super().__init__()
        ev = eigen_vectors if eigen_vectors is not None else torch.eye(EMBEDDING_SIZE)
        mu = means if means is not None else torch.zeros(EMBEDDING_SIZE)
        self.register_buffer("pca_eigen_vectors", torch.as_tensor(ev, dtype=torch.float64)
                             .reshape(EMBEDDING_SIZE, EMBEDDING_SIZE).clone())
        self.register_buffer("pca_means", torch.as_tensor(mu, dtype=torch.float64)
                             .reshape(EMBEDDING_SIZE).clone())

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings.to(torch.float64)
        pca = (x - self.pca_means) @ self.pca_eigen_vectors.T
        clipped = pca.clamp(QUANTIZE_MIN, QUANTIZE_MAX)
        scaled = (clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN))
        return scaled.floor().to(torch.uint8)
