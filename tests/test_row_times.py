"""timestamps_ms as T x 2 spans (the default): frame-wise rows, stacks (first frame to the end of
the last real frame), i3d (whose stacks also read the frame before their first stamp), flow
pairs, and the reference tool's one-column form, against counts worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from video_features.models.null.extractor import NullExtractor
from video_features.utils.config import make_config
from video_features.utils.windows import SlidingWindows, stack_windows

CPU = torch.device("cpu")
FPS = 25.0
D = 1000.0 / FPS


@pytest.fixture(scope="module")
def video(make_video):
    return make_video("times10.mp4", n_frames=10, fps=FPS, width=64, height=48)


def test_frame_rows_span_one_frame(video):
    out = NullExtractor(make_config("null", video_paths=["x"], device="cpu"), CPU).extract(str(video))
    t = out["timestamps_ms"]
    assert t.shape == (10, 2)
    np.testing.assert_allclose(t[:, 0], np.arange(10) * D)
    np.testing.assert_allclose(t[:, 1], np.arange(1, 11) * D)
    ref = NullExtractor(make_config("null", video_paths=["x"], device="cpu",
                                    timestamps_form="reference"), CPU).extract(str(video))
    np.testing.assert_allclose(ref["timestamps_ms"], np.arange(10) * D)


def test_extraction_fps_rows_span_a_slot(video):
    out = NullExtractor(make_config("null", video_paths=["x"], device="cpu", extraction_fps=10),
                        CPU).extract(str(video))
    t = out["timestamps_ms"]
    np.testing.assert_allclose(t[:, 0], np.arange(len(t)) * 100.0)
    np.testing.assert_allclose(t[:, 1] - t[:, 0], 100.0)


@pytest.mark.parametrize("size,step,tail", [(4, 4, "drop"), (4, 2, "drop"), (4, 3, "pad"),
                                            (3, 5, "pad")])
def test_stack_windows_give_first_and_last_real_frames(size, step, tail):
    n = 10
    w = SlidingWindows(size, step, tail)
    stamps = np.arange(n) * D
    windows = w.push(np.zeros((n, 1)), stamps) + w.finish()
    _, st = stack_windows(windows)
    starts = np.arange(0, n, step)
    starts = starts[starts + size <= n] if tail == "drop" else starts[starts < n]
    np.testing.assert_allclose(st[:, 0], starts * D)
    np.testing.assert_allclose(st[:, 1], np.minimum(starts + size - 1, n - 1) * D)


def test_i3d_spans_cover_the_frames_a_stack_reads(video):
    from video_features.models.i3d.extractor import I3DExtractor

    cfg = make_config("i3d", video_paths=["x"], device="cpu", streams=["rgb"], stack_size=4,
                      step_size=4, allow_random_weights=True)
    out = I3DExtractor(cfg, CPU).extract(str(video))
    # stacks of 4 elements read frames 0-4 and 4-8 (an element is a frame and its successor)
    np.testing.assert_allclose(out["timestamps_ms"], [[0, 5 * D], [4 * D, 9 * D]])


def test_flow_pairs_span_two_frames(video):
    from video_features.models.flow_out.extractor import PWCFlowExtractor

    cfg = make_config("pwc", video_paths=["x"], device="cpu", allow_random_weights=True,
                      extraction_total=4)
    out = PWCFlowExtractor(cfg, CPU).extract(str(video))
    t = out["timestamps_ms"]
    assert len(t) == len(out["pwc"]) == 3
    np.testing.assert_allclose(t[:, 1] - t[:, 0], 2 * 1000.0 / float(out["fps"]))
