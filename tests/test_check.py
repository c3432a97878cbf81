"""video-features check: the flags name exactly the defects planted in a generated run, in every
output format; the exit code gates on broken outputs only."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import run_main
from tests.test_finetune import write_mp4
from video_features.check import check, near_duplicate_runs
from video_features.utils.config import make_config
from video_features.utils.runner import run


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three 40-frame videos whose frames change brightness every frame; one has 12 black
    frames in the middle, one holds a frame still for 12 frames."""
    root = tmp_path_factory.mktemp("check")
    rng = np.random.default_rng(0)
    made = {}
    for name in ("clean", "black", "frozen"):
        levels = rng.permutation(np.linspace(40, 215, 40)).astype(np.uint8)
        frames = np.repeat(levels[:, None, None, None], 3, axis=3) * np.ones((40, 24, 32, 3), np.uint8)
        frames[:, :, :16] //= 2                          # some structure, not one flat colour
        if name == "black":
            frames[14:26] = 0
        if name == "frozen":
            frames[14:26] = frames[14]
        made[name] = write_mp4(root / f"{name}.mp4", frames, fps=10)
    return made


def _run(videos, out, mode="save_numpy", **kw):
    paths = [str(v) for v in videos.values()]
    s = run(make_config("null", video_paths=paths, device="cpu", on_extraction=mode,
                        output_path=str(out), input_root=str(next(iter(videos.values())).parent), **kw))
    assert s.count("done") == 3


@pytest.mark.parametrize("mode", ["save_numpy", "save_pickle", "save_hdf5", "save_webdataset",
                                  "save_parquet"])
def test_flags_name_exactly_the_planted_defects(videos, tmp_path, mode):
    _run(videos, tmp_path, mode)
    report = check(tmp_path)
    assert report.outputs == 3 and not report.errors
    flagged = {(f.output.rsplit("/", 1)[-1].split(":")[-1].replace("_", ""), f.flag) for f in report.findings}
    assert flagged == {("black", "near-duplicates"), ("frozen", "near-duplicates")}
    detail = next(f.detail for f in report.findings if "black" in f.output)
    assert "rows 14-25 (12 rows, 1.40-2.60 s)" in detail


def test_broken_outputs_fail_the_exit_code(videos, tmp_path):
    _run(videos, tmp_path)
    res = run_main("check", str(tmp_path))
    assert res.returncode == 0 and "checked 3 output(s): 0 error(s), 2 warning(s)" in res.stderr
    feats = tmp_path / "null" / "clean_null.npy"
    x = np.load(feats)
    x[3, 1] = np.nan
    np.save(feats, x)
    stamps = tmp_path / "null" / "frozen_timestamps_ms.npy"
    np.save(stamps, np.load(stamps)[:-2])
    (tmp_path / "null" / "black_null.npy").write_bytes(b"not an array")
    res = run_main("check", str(tmp_path))
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert any(ln.startswith("ERROR nan:") and "clean" in ln and "1 row(s)" in ln for ln in lines)
    assert any(ln.startswith("ERROR rows-vs-timestamps:") and "40 rows but 38 timestamps" in ln
               for ln in lines)
    assert any(ln.startswith("ERROR unreadable:") and "black" in ln for ln in lines)
    assert run_main("check", str(tmp_path / "nowhere")).returncode == 2


def test_near_duplicate_runs_and_constant_outputs():
    rows = np.arange(30, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32) + 1
    rows[10:20] = rows[10]
    assert near_duplicate_runs(rows, 8) == [(10, 19)]
    assert near_duplicate_runs(rows, 11) == []
    assert near_duplicate_runs(np.zeros((5, 3)), 3) == [(0, 4)]   # zero rows are the same too


def test_constant_rows_and_rows_past_the_end():
    from video_features.check import Output, check_output

    arrays = {"vggish": np.ones((3, 4), np.float32),
              "timestamps_ms": np.array([[0, 960], [960, 1920], [1920, 2880]], np.float64)}
    found = check_output(Output("vggish", "a.wav", {"media": {"duration_s": 1.5}}, lambda: arrays))
    assert [(f.flag, f.error) for f in found] == [("constant", False), ("past-the-end", False)]
    assert "silent audio?" in found[0].detail and "1 row(s) start after the input's 1.5 s" in found[1].detail
