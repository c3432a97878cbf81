"""Command-line parsing: classic flags, key=value, YAML files, validation before any model."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_main
from video_features.utils.config import parse_args
from video_features.utils.errors import ConfigError


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
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "input_root=2024"], "input_root"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "file_with_video_paths=0"],
     "file_with_video_paths"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "tf32=maybe"], "tf32"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "timestamps=frames"], "timestamps"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "on_mismatch=skip"], "on_mismatch"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "worker_timeout=-1"], "worker_timeout"),
    (["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a", "--device_ids", "x"], "device_ids"),
    (["--feature_type", "i3d", "--device", "cpu", "--video_paths", "a", "streams=[rgb,depth]"], "streams"),
    (["--feature_type", "i3d", "--device", "cpu", "--video_paths", "a", "--stack_size", "1.5"], "stack_size"),
    (["--feature_type", "vggish", "--device", "cpu", "--video_paths", "a", "postprocess=sometimes"], "postprocess"),
])
def test_invalid_values_name_the_option(argv, option):
    with pytest.raises(ConfigError) as ei:
        parse_args(argv)
    assert option in str(ei.value)


def _gpus(monkeypatch, n: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("n_gpus,message", [(0, "no CUDA GPU is available here; use --device cpu"),
                                            (1, "device_ids [2] do not exist: this machine has 1 GPU")])
def test_device_ids_are_checked_against_the_gpus_present(monkeypatch, n_gpus, message):
    _gpus(monkeypatch, n_gpus)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_args(["--feature_type", "resnet", "--device", "cuda", "--device_ids", "0", "2",
                    "--video_paths", "a"])


def test_device_ids_on_a_machine_with_enough_gpus(monkeypatch):
    _gpus(monkeypatch, 3)
    cfg = parse_args(["--feature_type", "resnet", "--device", "cuda", "--device_ids", "0", "2",
                      "--video_paths", "a"])
    assert cfg.device_ids == [0, 2] and cfg.batch_size == 64  # auto: the GPU default


def test_values_are_typed_by_the_schema(tmp_path):
    (tmp_path / "2024").mkdir()
    cfg = parse_args(["--feature_type", "i3d", "--device", "cpu", "--video_paths", "a",
                      f"input_root={tmp_path / '2024'}", "--output_path", "0001", "streams=flow",
                      "stack_size=16", "extraction_fps=5", "progress=false", "--tf32", "true"])
    assert cfg.output_path == "0001"           # text stays text
    assert cfg.streams == ["flow"] and cfg.stack_size == 16
    assert cfg.extraction_fps == 5.0 and isinstance(cfg.extraction_fps, float)
    assert cfg.progress is False and cfg.tf32 is True


def test_schema_and_yaml_defaults_cover_each_other():
    """Every option has a type (schema) and a default (configs/), and nothing else exists."""
    from video_features.models.registry import feature_types
    from video_features.utils.config import defaults_for, schema_fields, schema_for

    for ft in feature_types():
        fields = schema_fields(schema_for(ft))
        defaults = defaults_for(ft)
        assert set(defaults) == set(fields), ft
        for key, (_, f) in fields.items():
            assert f.metadata.get("help"), (ft, key)


def test_typed_errors_exit_2_without_traceback(tmp_path):
    for word in ("input_root=2024", "file_with_video_paths=0", "batch_size=2.5"):
        res = run_main("--feature_type", "resnet", "--device", "cpu", "--video_paths", "a.mp4",
                       word, cwd=tmp_path)
        assert res.returncode == 2, (word, res.stderr)
        assert word.split("=")[0] in res.stderr and "Traceback" not in res.stderr


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


def test_extraction_total_and_fps_are_mutually_exclusive():
    cfg = parse_args(["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a",
                      "extraction_total=16"])
    assert cfg.extraction_total == 16 and cfg.extraction_fps is None
    with pytest.raises(ConfigError, match="mutually exclusive"):
        parse_args(["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a",
                    "extraction_total=16", "extraction_fps=5"])
    with pytest.raises(ConfigError, match="extraction_total must be >= 1"):
        parse_args(["--feature_type", "resnet", "--device", "cpu", "--video_paths", "a",
                    "extraction_total=0"])


def test_a_missing_optional_package_names_what_needs_it_and_how_to_install_it():
    from video_features.utils.errors import require

    assert require("json", "anything") is json
    assert require("os.path", "anything") is os.path        # a submodule is returned itself
    with pytest.raises(ConfigError) as err:
        require("no_such_package.sub", "feature_type=x", extra="x")
    assert str(err.value) == ("feature_type=x needs no_such_package (No module named "
                              "'no_such_package'): pip install no_such_package (or the [x] extra)")
    with pytest.raises(ConfigError, match=r"^report needs pkg>=2 \(.*\): pip install pkg>=2$"):
        require("no_such_package", "report", pip="pkg>=2")
