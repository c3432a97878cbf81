"""The command line's own answers: help, usage errors (abbreviations, typos, a missing feature
type), and that they come without importing torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_main

PLUGIN = {"VIDEO_FEATURES_PLUGINS": "faulty=tests.faulty_extractor:FaultyExtractor"}


def usage_error(*args: str, env: dict | None = None) -> str:
    """The one-line error of a command line that cannot start (exit code 2, no traceback)."""
    res = run_main(*args, timeout=120, env=env)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_abbreviated_flags_are_refused_with_the_option_they_stand_for():
    line = usage_error("--feature_typ", "resnet", "--video_paths", "a.mp4")
    assert line == "error: unknown option --feature_typ (did you mean --feature_type?)"
    line = usage_error("--feature_type", "resnet", "--video_path", "a.mp4")
    assert line == ("error: unknown option --video_path for feature_type=resnet "
                    "(did you mean --video_paths?)")
    line = usage_error("--feature_type", "resnet", "--video_paths=a.mp4", "--dev=cpu")
    assert "unknown option --dev " in line and "did you mean --device?" in line


def test_key_value_typo_suggests_the_option():
    line = usage_error("--feature_type", "resnet", "--video_paths", "a.mp4", "modle_name=resnet18")
    assert line == ("error: unknown option 'modle_name' for feature_type=resnet "
                    "(did you mean model_name?)")
    # an option of other feature types says whose it is
    line = usage_error("--feature_type", "resnet", "--video_paths", "a.mp4", "stack_size=8")
    assert "unknown option 'stack_size' for feature_type=resnet" in line
    assert "an option of feature_type i3d, r21d" in line


def test_missing_feature_type_lists_every_type_plugins_included():
    from video_features.models.registry import feature_types

    line = usage_error("--video_paths", "a.mp4", env=PLUGIN)
    assert line.startswith("error: feature_type is required (--feature_type ")
    listed = line.split("--feature_type ", 1)[1].rstrip(")").split("|")
    assert set(listed) == set(feature_types()) | {"faulty"}


def test_unknown_flag_is_named_before_the_missing_feature_type():
    line = usage_error("--feature_tpye", "resnet", "--video_paths", "a.mp4")
    assert line == "error: unknown option --feature_tpye (did you mean --feature_type?)"
    line = usage_error("--video_paths", "a.mp4", "featuretype=resnet")
    assert "unknown option 'featuretype'" in line and "did you mean feature_type?" in line


def test_stray_words_and_bad_choices_are_usage_errors():
    line = usage_error("a.mp4", "--feature_type", "resnet")
    assert "unexpected argument 'a.mp4'" in line
    line = usage_error("--feature_type", "resnet", "--video_paths", "a.mp4", "--device", "gpu")
    assert line == "error: option device: 'gpu' is not one of auto, cuda, cpu"
    line = usage_error("--feature_type", "i3d", "--video_paths", "a.mp4", "streams=[rgb,flo]")
    assert line == "error: option streams: 'flo' is not one of rgb, flow"
    line = usage_error("--feature_type", "resnet")
    assert line == "error: no inputs: give --video_paths or --file_with_video_paths"


def test_help_mentions_the_subcommands():
    res = run_main("--help", timeout=120)
    assert res.returncode == 0, res.stderr
    usage = res.stdout.split("\n\n", 1)[0]
    assert "{check,report,finetune}" in usage
    for line in ("main.py check OUTPUT_PATH", "main.py report OUTPUT_PATH", "main.py finetune"):
        assert line in res.stdout


def _section(help_text: str, feature_type: str) -> str:
    return help_text.split(f"options of feature_type={feature_type}:\n", 1)[1].split("\n\n", 1)[0]


def test_help_lists_under_each_feature_type_every_option_it_takes():
    res = run_main("--help", "--feature_type", "resnet", timeout=120)
    assert res.returncode == 0, res.stderr
    resnet = _section(res.stdout, "resnet")
    assert "--model_name MODEL_NAME" in resnet and "resnet18 | resnet34" in resnet
    assert "--crops CROPS" in resnet and "options of feature_type=clap" not in res.stdout
    # every type's section names each of its options, with its own text where it differs
    res = run_main("--help", timeout=120)
    assert res.returncode == 0, res.stderr
    resnet, clip = _section(res.stdout, "resnet"), _section(res.stdout, "clip")
    assert "--model_name" in resnet and "resnet18 | resnet34" in resnet
    assert "--model_name" in clip and "OpenAI CLIP" in clip
    assert "--crops CROPS         as under feature_type=clip (default: 'center')" in resnet
    for ft in ("r21d", "i3d"):
        assert "--stack_size" in _section(res.stdout, ft)
    assert "none beyond the shared ones" in _section(res.stdout, "null")


def test_help_of_a_plugin_type_shows_its_schema_options():
    res = run_main("--help", "--feature_type", "faulty", timeout=120, env=PLUGIN)
    assert res.returncode == 0, res.stderr
    assert "--busy_seconds" in _section(res.stdout, "faulty") and "(default: 10.0)" in res.stdout


@pytest.mark.parametrize("args", [["--help"], ["--list_recipes"],
                                  ["--feature_typ", "resnet", "--video_paths", "a.mp4"],
                                  ["--feature_type", "resnet", "--video_paths", "a", "--device", "gpu"],
                                  ["--video_paths", "a.mp4"], ["finetune", "--help"],
                                  ["finetune", "lrr=0.1"], ["finetune", "--train_annot", "a"]])
def test_help_recipes_and_usage_errors_do_not_import_torch(args):
    code = ("import sys\nfrom video_features.cli import main\n"
            f"try:\n    rc = main({args!r})\nexcept SystemExit as exc:\n    rc = exc.code\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'transformers', 'timm') "
            "if m in sys.modules)\nprint('RESULT', rc, heavy)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    result = res.stdout.strip().splitlines()[-1]
    assert result.startswith("RESULT") and result.endswith("[]"), (result, res.stderr[-2000:])


def test_finetune_refuses_abbreviations():
    line = usage_error("finetune", "--train_annot", "a.csv")
    assert "unknown option --train_annot" in line and "did you mean --train_annotations?" in line


def test_finetune_key_value_typo_suggests_the_option():
    line = usage_error("finetune", "lrr=0.1")
    assert "unknown option 'lrr' for finetune (did you mean lr?)" in line


@pytest.mark.parametrize("command,flag", [("check", "--x"), ("report", "--ou")])
def test_check_and_report_refuse_abbreviations(tmp_path, command, flag):
    res = run_main(command, flag, "y", str(tmp_path))
    assert res.returncode == 2 and f"unrecognized arguments: {flag}" in res.stderr


def test_option_index_is_current():
    """models/options_index.py holds what --help reads without torch; it is ignored (slower, still
    right) when stale, and this test keeps it current."""
    from video_features.models.options_index import INDEX
    from video_features.models.registry import build_index

    built = build_index()
    stale = sorted(ft for ft in built.keys() | INDEX.keys() if built.get(ft) != INDEX.get(ft))
    assert not stale, (f"the option index is stale for {', '.join(stale)}: run python -m "
                       "video_features.models.registry --write-index and commit "
                       "models/options_index.py")


def test_a_changed_schema_makes_its_index_entry_stale(monkeypatch):
    from video_features.models import registry
    from video_features.utils.config import option_rows, schema_for, schema_rows

    assert registry.indexed_options("resnet") == schema_rows(schema_for("resnet"))
    path = registry._module_file("video_features.models.resnet.extractor")
    text = path.read_text()
    edited = text.replace("class ResNetOptions(CropOptions):\n",
                          "class ResNetOptions(CropOptions):\n    extra: int = option('new')\n")
    assert edited != text
    monkeypatch.setitem(registry._texts, path, edited)
    assert registry.indexed_options("resnet") is None
    assert option_rows("resnet") == schema_rows(schema_for("resnet"))  # read from the schema
    # the extractor's other code may change freely
    monkeypatch.setitem(registry._texts, path, text.replace("    def ", "    # note\n    def ", 1))
    assert registry.indexed_options("resnet") is not None
