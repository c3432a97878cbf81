"""Recipes: every shipped one is valid for its feature type, layers under --config / flags /
words, is recorded as NAME@VERSION, and bad names, versions or feature types are clear errors."""
from __future__ import annotations

import pytest

from tests.conftest import run_main
from video_features.utils.config import parse_configs
from video_features.utils.errors import ConfigError
from video_features.utils.recipes import describe_recipes, load_recipe, recipe_names

EXPECTED = {"i3d_thumos14_16x4", "i3d_reference_64x64", "resnet50_1fps", "r21d_24fps", "vggish_096",
            "i3d_rtfm_10crop"}


def test_the_recipes_the_field_asks_for_are_shipped():
    assert EXPECTED <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_gives_its_options(name):
    recipe = load_recipe(name)
    (cfg,) = parse_configs(["--recipe", name, "--video_paths", "a.mp4", "device=cpu"])
    assert cfg.feature_type == recipe.feature_type
    assert cfg.recipe == f"{name}@{recipe.version}"
    for key, value in recipe.options.items():
        if key != "feature_type":
            assert cfg[key] == value, key
    assert recipe.source and recipe.matches


def test_the_thumos_grid():
    (cfg,) = parse_configs(["--recipe", "i3d_thumos14_16x4", "--video_paths", "a.mp4"])
    assert (cfg.stack_size, cfg.step_size, cfg.extraction_fps) == (16, 4, 30)
    assert cfg.streams == ["rgb", "flow"]


def test_options_override_a_recipe_in_order(tmp_path):
    conf = tmp_path / "c.yml"
    conf.write_text("step_size: 8\nstack_size: 32\n")
    (cfg,) = parse_configs(["--recipe", "i3d_thumos14_16x4", "--config", str(conf),
                            "--video_paths", "a.mp4", "--stack_size", "24"])
    assert cfg.step_size == 8           # the file beats the recipe
    assert cfg.stack_size == 24         # a flag beats the file
    assert cfg.extraction_fps == 30     # the rest is the recipe's
    (cfg,) = parse_configs(["recipe=resnet50_1fps", "video_paths=[a.mp4]", "extraction_fps=2"])
    assert cfg.extraction_fps == 2 and cfg.model_name == "resnet50"
    # the recipe may also come from the --config file
    conf.write_text("recipe: vggish_096\n")
    (cfg,) = parse_configs(["--config", str(conf), "--video_paths", "a.wav"])
    assert cfg.feature_type == "vggish" and cfg.recipe.startswith("vggish_096@")


@pytest.mark.parametrize("argv,match", [
    (["--recipe", "nope"], "no recipe 'nope'; known: .*resnet50_1fps"),
    (["--recipe", "resnet50_1fps@7"], "version 1 here, not 7"),
    (["--recipe", "resnet50_1fps", "--feature_type", "i3d"], "recipe for feature_type=resnet"),
])
def test_bad_recipes_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_configs([*argv, "--video_paths", "a.mp4"])


def test_list_recipes_on_the_command_line():
    res = run_main("--list_recipes")
    assert res.returncode == 0
    assert res.stdout == describe_recipes()
    for name in EXPECTED:
        assert f"{name}@" in res.stdout
    assert "ActionFormer" in res.stdout and "options: feature_type=i3d" in res.stdout


def test_an_earlier_version_of_a_recipe_still_gives_its_options():
    (now,) = parse_configs(["--recipe", "i3d_thumos14_16x4", "--video_paths", "a.mp4"])
    (old,) = parse_configs(["--recipe", "i3d_thumos14_16x4@1", "--video_paths", "a.mp4"])
    assert (now.recipe, now.flow_type) == ("i3d_thumos14_16x4@2", "tvl1")
    assert (old.recipe, old.flow_type) == ("i3d_thumos14_16x4@1", "pwc")
    assert (old.stack_size, old.step_size, old.extraction_fps) == (16, 4, 30)
    assert "PWC-Net" in load_recipe("i3d_thumos14_16x4@1").matches
    with pytest.raises(ConfigError, match=r"not 3 \(versions kept: 1, 2\)"):
        load_recipe("i3d_thumos14_16x4@3")
    assert "i3d_thumos14_16x4@1" in describe_recipes()
