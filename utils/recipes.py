"""Recipes: named, versioned bundles of options that reproduce a published feature set.

A recipe is ``configs/recipes/<name>.yml``: ``name``, ``version``, ``source`` (paper and
repository), ``matches`` (which released features it reproduces, and how closely) and
``options`` (``feature_type`` included). A recipe whose options changed keeps its earlier
versions under ``previous`` (version -> ``matches`` and the complete ``options``), so
``NAME@1`` still gives what version 1 gave. ``--recipe NAME`` applies the options as a layer after
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
    """``NAME`` (its current version) or ``NAME@VERSION`` (any version the file keeps) -> the
    recipe; a version the file does not have is an error."""
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
    if not version or version == str(recipe.version):
        return recipe
    previous = {str(k): v for k, v in (data.get("previous") or {}).items()}
    old = previous.get(version)
    if not isinstance(old, dict) or "feature_type" not in (old.get("options") or {}):
        kept = ", ".join(sorted([*previous, str(recipe.version)], key=int))
        raise ConfigError(f"option recipe: {name} is at version {recipe.version} here, not "
                          f"{version} (versions kept: {kept})")
    return Recipe(name, int(version), recipe.source, str(old.get("matches", "")).strip(),
                  dict(old["options"]))


def previous_versions(name: str) -> list[int]:
    """The earlier versions recipe ``name`` still gives."""
    from video_features.utils.config import read_yaml

    return sorted(int(k) for k in (read_yaml(RECIPE_DIR / f"{name}.yml").get("previous") or {}))


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
                  f"  matches: {r.matches}"]
        older = previous_versions(name)
        if older:
            lines.append("  earlier: " + ", ".join(f"{name}@{v}" for v in older)
                         + " (--recipe NAME@VERSION gives its options)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
