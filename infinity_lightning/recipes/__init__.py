"""Recipes: YAML files composed with OmegaConf and turned into training objects.

:mod:`.loader` reads, composes, overrides and validates recipe files (no torch needed);
:mod:`.build` turns a recipe of either kind into a LightningModule, a DataModule, trainer
arguments and callbacks.  The build names are imported on first use, so reading recipes stays
cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from .loader import (SECTIONS, RecipeError, apply_overrides, check_kwargs, list_recipes, load_recipe, resolve_recipe,
                     save_recipe, to_dict, trainer_kwargs, validate)

_BUILD_NAMES = ("Run", "build_run", "load_run_recipe", "recipe_kind", "recipe_schema", "recipe_components",
                "missing_values", "KINDS")

__all__ = ["SECTIONS", "RecipeError", "apply_overrides", "check_kwargs", "list_recipes", "load_recipe", "resolve_recipe",
           "save_recipe", "to_dict", "trainer_kwargs", "validate", *_BUILD_NAMES]


def __getattr__(name: str) -> Any:
    if name in _BUILD_NAMES:
        return getattr(importlib.import_module(".build", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
