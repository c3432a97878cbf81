"""Shared checks of ``crops`` outputs, for the test modules of each visual feature type."""
from __future__ import annotations

import numpy as np


def check_views(rows: np.ndarray, center: np.ndarray, views: int, mirror_equal: bool = False) -> None:
    """``rows`` (T, views, ...) of a crops=5/10 run against ``center`` (T, ...) of the same
    input with crops=center: view 4 is the centre crop, the corner views differ from it. With a
    network that only averages its input (``mirror_equal``), a view of the flipped frame equals
    the unflipped view of the same region: TenCrop's view 5 (top-left of the flipped frame) is
    the top-right region, 6 top-left, 7 bottom-right, 8 bottom-left. (View 9, the centre of
    the flipped frame, is the mirror of view 4 only where the margin around it is even.)"""
    assert rows.shape == (center.shape[0], views, *center.shape[1:])
    scale = max(float(np.abs(center).max()), 1e-12)
    np.testing.assert_allclose(rows[:, 4], center, rtol=0, atol=1e-5 * scale)
    assert not np.allclose(rows[:, 0], rows[:, 4])
    assert not np.allclose(rows[:, 0], rows[:, 3])
    if views == 10 and mirror_equal:
        for flipped, plain in ((5, 1), (6, 0), (7, 3), (8, 2)):
            np.testing.assert_allclose(rows[:, flipped], rows[:, plain], rtol=0, atol=1e-5 * scale)


def with_crops(upstream, crops: str):
    """A torchvision ``Compose`` eval transform (open_clip's, timm's) with its CenterCrop
    replaced by torchvision's FiveCrop / TenCrop: the steps after the crop run on every view, and
    the views are stacked ``(V, C, h, w)``: the definition the ``crops`` option follows."""
    import torch
    from torchvision import transforms as T

    steps = list(upstream.transforms)
    at = next(i for i, s in enumerate(steps) if isinstance(s, T.CenterCrop))
    size = steps[at].size
    crop = T.FiveCrop(size) if crops == "5" else T.TenCrop(size)
    before, after = T.Compose(steps[:at]), T.Compose(steps[at + 1:])
    return lambda img: torch.stack([after(v) for v in crop(before(img))])
