"""The record beside each output (<stem>_meta.json): tool version, feature type, every option,
checkpoint identities, frames used, wall time, and the input's size, duration and codecs."""
from __future__ import annotations

import json

from video_features.utils.config import make_config
from video_features.utils.runner import run


def test_sidecar_describes_the_input_and_the_run(make_video, tmp_path):
    video = make_video("side.mp4", n_frames=12, fps=25.0, width=64, height=48)
    cfg = make_config("null", video_paths=[str(video)], device="cpu", on_extraction="save_numpy",
                      output_path=str(tmp_path / "out"), input_root=str(video.parent), progress=False)
    assert run(cfg).count("done") == 1
    meta = json.loads((tmp_path / "out" / "null" / "side_meta.json").read_text())
    media = meta["media"]
    assert media["bytes"] == video.stat().st_size
    assert media["video"]["codec"] == "h264"
    assert (media["video"]["width"], media["video"]["height"]) == (64, 48)
    assert abs(media["duration_s"] - 12 / 25) < 0.05 and media["audio"]["codec"]
    assert meta["record"]["feature_type"] == "null" and meta["record"]["tool_version"]
    assert meta["config"]["extraction_fps"] is None and "timestamps_form" in meta["config"]
    assert meta["extraction"]["frames"] == 12 and meta["extraction"]["seconds"] > 0
    assert meta["outputs"]["null"]["shape"] == [12, 3]
