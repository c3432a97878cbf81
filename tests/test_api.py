"""The Python API and the installed package: arrays equal to the command line's, reuse of
loaded models, bad inputs, and a wheel whose modules all live under video_features."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import video_features as vf
from tests.conftest import run_main
from video_features.utils.errors import ConfigError, VideoError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def videos(make_video):
    return [make_video(f"api{i}.mp4", n_frames=5 + i, width=64, height=48, seed=i) for i in range(2)]


def test_extract_one_and_many_equal_the_command_line(videos, tmp_path):
    one = vf.extract(videos[0], feature_type="null", device="cpu")
    assert set(one) == {"null", "fps", "timestamps_ms"} and one["null"].shape == (5, 3)
    res = run_main("--feature_type", "null", "--device", "cpu", "--video_paths", str(videos[0]),
                   "--on_extraction", "save_numpy", "--output_path", str(tmp_path / "out"),
                   f"input_root={videos[0].parent}", "progress=false")
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "null" / "api0_null.npy"), one["null"])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"nope")
    outs = list(vf.extract([videos[0], bad, videos[1]], feature_type="null", device="cpu"))
    assert [o["path"] for o in outs] == [str(videos[0]), str(bad), str(videos[1])]
    assert "error" in outs[1] and "null" not in outs[1] and "\n" not in outs[1]["error"]
    np.testing.assert_array_equal(outs[0]["null"], one["null"])
    assert outs[2]["null"].shape == (6, 3)


def test_an_extractor_keeps_its_model_between_calls(videos):
    ex = vf.FeatureExtractor("resnet", device="cpu", model_name="resnet18",
                             allow_random_weights=True, extraction_fps=10)
    net = ex.extractor.net
    a, b = ex(videos[0]), ex(videos[1])
    assert ex.extractor.net is net and a["resnet"].shape[1] == b["resnet"].shape[1] == 512
    with pytest.raises(VideoError):
        ex(videos[0].parent / "missing.mp4")


def test_options_are_checked_as_on_the_command_line():
    with pytest.raises(ConfigError, match="extraction_fps"):
        vf.FeatureExtractor("null", device="cpu", extraction_fps=-1)


def test_the_wheel_installs_only_the_video_features_package(tmp_path):
    src = tmp_path / "src"  # a copy: building leaves build/ and egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, src / name)
    for name in ("video_features", "utils", "models", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("video_features-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"video_features"}
    for needed in ("video_features/utils/config.py", "video_features/models/i3d/extractor.py",
                   "video_features/configs/defaults.yml", "video_features/configs/recipes/vggish_096.yml",
                   "video_features/models/i3d/labels/kinetics400.txt", "video_features/cli.py"):
        assert needed in names, needed
    for package in sorted(p.parent.name for p in (REPO / "models").glob("*/__init__.py")):
        assert f"video_features/models/{package}/__init__.py" in names, package  # pyproject lists it
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "video-features = video_features.cli:entry" in zipfile.ZipFile(wheel).read(entry).decode()
    # installed elsewhere, it runs without the checkout
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    run = subprocess.run([sys.executable, "-c", "import video_features, sys; from video_features.cli "
                          "import main; sys.exit(main(['--list_recipes']))"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "i3d_thumos14_16x4@1" in run.stdout
    check = subprocess.run([sys.executable, "-c", "import video_features.utils.config as c; "
                            "print(c.__file__); print(c.CONFIG_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path,
                           env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert str(target) in check.stdout.splitlines()[0], check.stderr
