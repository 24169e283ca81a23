"""Training recipes: YAML files shipped in ``ichd_ray/recipes/``, loaded by name (torchtune style).

A recipe names only what differs from the config models' defaults. A run's config is resolved as
model defaults <- recipe (``--recipe``, default ``demo``) <- ``--config`` file <- CLI flags, and the
bundle records the recipe's name and the sha256 of its file beside the resolved config.

``ichd-ray recipes`` lists them, ``ichd-ray recipes NAME`` prints one resolved, ``ichd-ray recipes cp
NAME FILE`` writes that resolved form (every field set, so the copy alone is the whole config whatever
recipe it is later overlaid on) for editing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from ichd_ray.config.job import ConfigError

__all__ = ["RECIPE_ALIASES", "Recipe", "recipe_names", "load_recipe", "resolved_yaml"]

#: Old names that keep working: ``rsna`` was the preset the 1st-place recipe grew from.
RECIPE_ALIASES: dict[str, str] = {"rsna": "rsna1st"}



@dataclass(frozen=True)
class Recipe:
    """One shipped recipe file.

    Args:
        name: file stem, e.g. ``demo``.
        description: the file's first comment line, after ``NAME:``.
        text: the file as shipped (comments included).
        sha256: of the file's bytes; recorded in every bundle trained from it.
    """

    name: str
    description: str
    text: str
    sha256: str

    def sections(self) -> dict[str, dict[str, Any]]:
        """The recipe's ``{section: {field: value}}`` (not yet validated)."""
        data = yaml.safe_load(self.text) or {}
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ConfigError(f"recipe {self.name}: expected a mapping of sections at the top level")
        return data

    def provenance(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


def _folder():
    # A data folder inside the package (pyproject package-data), not a package: it holds no code.
    return resources.files("ichd_ray").joinpath("recipes")


def recipe_names() -> list[str]:
    """Every shipped recipe, sorted (aliases not included)."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> Recipe:
    """The shipped recipe ``name`` (or an alias of one).

    Raises:
        ConfigError: no such recipe (the message lists them), or its first line is not ``# NAME: what``.
    """
    canonical = RECIPE_ALIASES.get(name, name)
    names = recipe_names()
    if canonical not in names:
        aliases = ", ".join(f"{a} = {b}" for a, b in sorted(RECIPE_ALIASES.items()))
        raise ConfigError(f"recipe: expected one of {names} (aliases: {aliases}), got {name!r}")
    data = _folder().joinpath(f"{canonical}.yaml").read_bytes()
    text = data.decode("utf-8")
    first = text.splitlines()[0] if text else ""
    prefix = f"# {canonical}:"
    if not first.startswith(prefix):
        raise ConfigError(f"recipe {canonical}: its first line must be '{prefix} <what it is>', got {first!r}")
    return Recipe(canonical, first[len(prefix):].strip(), text, hashlib.sha256(data).hexdigest())


def resolved_yaml(recipe: Recipe, resolved: dict[str, Any]) -> str:
    """What ``recipes NAME`` prints and ``recipes cp`` writes: a header naming the recipe, then every field."""
    header = (
        f"# {recipe.name}: {recipe.description}\n"
        f"# Resolved from recipe {recipe.name} (sha256 {recipe.sha256}).\n"
        "# Every field is set, so this file alone is the whole config, whatever recipe it overlays.\n"
        "# Edit it, check it with `ichd-ray config validate FILE`, train with `--config FILE`.\n"
    )
    return header + yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False)
