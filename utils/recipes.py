"""Recipes: named, versioned bundles of options that reproduce a published feature set.

A recipe is ``configs/recipes/<name>.yml``: ``name``, ``version``, ``source`` (paper and
repository), ``matches`` (which released features it reproduces, and how closely) and
``options`` (``feature_type`` included). ``--recipe NAME`` applies the options as a layer after
the defaults and before ``--config``, flags and ``key=value`` words, so any of them can still be
overridden; the run's ``recipe`` option (recorded with every output) then reads
``NAME@VERSION``. This module stays free of torch so that ``--list_recipes`` is instant.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from video_features.utils.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs" / "recipes"


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    source: str
    matches: str
    options: dict

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def feature_type(self) -> str:
        return str(self.options["feature_type"])


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yml"))


def load_recipe(spec: str) -> Recipe:
    """``NAME`` or ``NAME@VERSION`` -> the recipe (a version that is not the shipped one is an
    error: the options of older versions are not kept)."""
    from video_features.utils.config import read_yaml

    name, _, version = str(spec).partition("@")
    path = RECIPE_DIR / f"{name}.yml"
    if not name or not path.is_file():
        raise ConfigError(f"option recipe: no recipe {name!r}; known: {', '.join(recipe_names())} "
                          "(--list_recipes describes them)")
    data = read_yaml(path)
    missing = [k for k in ("name", "version", "source", "matches", "options") if k not in data]
    if missing or data["name"] != name or "feature_type" not in (data.get("options") or {}):
        raise ConfigError(f"recipe file {path} is malformed: needs name ({name}), version, source, "
                          "matches and options with a feature_type")
    recipe = Recipe(name, int(data["version"]), str(data["source"]).strip(),
                    str(data["matches"]).strip(), dict(data["options"]))
    if version and version != str(recipe.version):
        raise ConfigError(f"option recipe: {name} is at version {recipe.version} here, not {version}")
    return recipe


def recipe_layer(spec: str, feature_types: list[str] | None) -> dict[str, Any]:
    """The option layer of recipe ``spec``; ``feature_types`` given on the command line must be
    the recipe's."""
    recipe = load_recipe(spec)
    if feature_types and feature_types != [recipe.feature_type]:
        raise ConfigError(f"option recipe: {recipe.name} is a recipe for feature_type="
                          f"{recipe.feature_type}, not {' '.join(feature_types)}")
    return {**recipe.options, "recipe": recipe.tag}


def describe_recipes() -> str:
    """The text of ``--list_recipes``."""
    lines = []
    for name in recipe_names():
        r = load_recipe(name)
        opts = " ".join(f"{k}={_text(v)}" for k, v in r.options.items())
        lines += [f"{r.tag}", f"  options: {opts}", f"  source:  {r.source}",
                  f"  matches: {r.matches}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
