"""Command-line parsing: classic flags, key=value, YAML files, validation before any model."""
from __future__ import annotations

import pytest

from tests.conftest import run_main
from utils.config import parse_args
from utils.errors import ConfigError


def test_classic_flags_and_lists():
    cfg = parse_args(["--feature_type", "resnet50", "--device", "cpu", "--video_paths", "a.mp4", "b.mp4",
                      "--batch_size", "8", "--extraction_fps", "2.5", "--show_pred", "true"])
    assert cfg.feature_type == "resnet" and cfg.model_name == "resnet50"  # alias + yml default
    assert cfg.video_paths == ["a.mp4", "b.mp4"]
    assert cfg.batch_size == 8 and cfg.extraction_fps == 2.5 and cfg.show_pred is True


def test_key_value_overrides_and_config_file(tmp_path):
    yml = tmp_path / "my.yml"
    yml.write_text("feature_type: resnet\nbatch_size: 3\nmodel_name: resnet18\ndevice: cpu\n")
    cfg = parse_args(["--config", str(yml), "--video_paths", "a.mp4", "model_name=resnet101",
                      "cpu_workers=2"])
    assert cfg.model_name == "resnet101"   # key=value beats the file
    assert cfg.batch_size == 3             # file beats the defaults
    assert cfg.cpu_workers == 2


def test_file_with_video_paths(tmp_path):
    (tmp_path / "v1.mp4").write_bytes(b"x")
    lst = tmp_path / "list.txt"
    lst.write_text("# my videos\nv1.mp4\n\n/abs/v2.mp4\nv1.mp4\n")
    cfg = parse_args(["--feature_type", "resnet", "--device", "cpu", "--file_with_video_paths", str(lst)])
    assert cfg.video_paths == [str(tmp_path / "v1.mp4"), "/abs/v2.mp4"]  # relative to the list, deduplicated


@pytest.mark.parametrize("argv,option", [
    (["--feature_type", "nope", "--video_paths", "a"], "feature_type"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "model_name=resnet19"], "model_name"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "--batch_size", "0"], "batch_size"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "batch_size=many"], "batch_size"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "--on_extraction", "keep"], "on_extraction"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "extraction_fps=-1"], "extraction_fps"),
    (["--feature_type", "resnet", "--device", "gpu", "--video_paths", "a"], "device"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "colour=red"], "colour"),
    (["--feature_type", "resnet", "--device", "cpu"], "video_paths"),
    (["--feature_type", "resnet", "--device", "cuda", "--device_ids", "0", "2", "--video_paths", "a"], "cpu"),
])
def test_invalid_values_name_the_option(argv, option):
    with pytest.raises(ConfigError) as ei:
        parse_args(argv)
    assert option in str(ei.value)


def test_help_documents_every_option():
    res = run_main("--feature_type", "resnet", "--help")
    assert res.returncode == 0
    for opt in ("--video_paths", "--device_ids", "--on_extraction", "--extraction_fps", "--model_name",
                "--allow_random_weights", "--file_with_video_paths", "--output_path", "--show_pred"):
        assert opt in res.stdout


def test_invalid_option_fails_before_loading_models():
    res = run_main("--feature_type", "resnet", "--device", "cpu", "--video_paths", "sample/A.mp4",
                   "model_name=vgg16")
    assert res.returncode == 2
    assert "model_name" in res.stderr and "Traceback" not in res.stderr
