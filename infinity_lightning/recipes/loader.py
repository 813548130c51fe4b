"""Recipes: OmegaConf YAML files with inheritance, dot-list overrides and strict validation.

A recipe is a YAML file, given by path or by a built-in name (``"var/quickstart"`` is
``recipes/var/quickstart.yaml`` in the installed package data).  A top-level ``base`` key (a name
or path, or a list of them) names recipes that are loaded first; the file's own keys are merged on
top (nested mappings merge key by key, everything else replaces).  A relative ``base`` path is
looked up next to the file first, then among the built-in recipes.

Overrides are OmegaConf dot-list strings.  ``trainer.max_steps=100`` must name a key that the
recipe already has: a typo is an error that lists close matches.  ``+trainer.foo=1`` adds a
new key on purpose.  Values are parsed as YAML (``1`` is an int, ``[1,2]`` a list, ``null`` None).

Every key is checked against a schema: unknown keys and wrong types are errors naming the dotted
key and the file it came from.  Example::

    # my_recipe.yaml
    base: var/quickstart
    trainer:
      max_steps: 200
    model:
      preset: tiny

    cfg = load_recipe("my_recipe.yaml", ["trainer.max_steps=50", "+trainer.log_every_n_steps=5"],
                      schema={"trainer": dict, "model": {"preset": str, "lr": float}})
    trainer = lightning.Trainer(**trainer_kwargs(cfg.trainer))

Schemas are nested dicts (key -> schema), dataclass types (fields and their annotations), or
types: ``int``, ``float`` (ints accepted), ``str``, ``bool``, ``list``, ``dict`` / ``Any``
(anything below is accepted), ``Optional[...]``, ``Union[...]``, ``List[...]``,
``Tuple[...]``, ``Dict[str, ...]``, ``Literal[...]``.  A dict schema may hold the key ``"*"``,
the schema of every key it does not name (a free-form mapping with typed values).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib.resources
import inspect
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:
    from ..io import PathLike

__all__ = [
    "RecipeError",
    "Switch",
    "load_recipe",
    "resolve_recipe",
    "list_recipes",
    "apply_overrides",
    "validate",
    "trainer_kwargs",
    "check_kwargs",
    "save_recipe",
    "to_dict",
]

BASE_KEY = "base"
RECIPE_PACKAGE = "infinity_lightning.recipes_data"
_ANY = object()  # marker: anything is accepted below this point


class RecipeError(ValueError):
    """A recipe file, override or section is invalid; the message names the file and the key."""


class Switch(dict):
    """A section schema (key -> schema) whose value may also be ``true`` (on, with defaults),
    ``false`` or ``null`` (off): the schema of a switchable component such as a callback."""


# -- finding recipe files ---------------------------------------------------------------------
def _recipes_root() -> Path:
    return Path(str(importlib.resources.files(RECIPE_PACKAGE)))


def list_recipes() -> List[str]:
    """Names of the built-in recipes (``"var/quickstart"``, ...), sorted."""
    root = _recipes_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_recipe(path_or_name: PathLike, relative_to: Optional[Path] = None) -> Path:
    """The file of a recipe given as a path, a path relative to ``relative_to``, or a built-in name."""
    raw = str(path_or_name)
    candidates = []
    if relative_to is not None and not os.path.isabs(raw):
        candidates.append(relative_to / raw)
    candidates.append(Path(raw).expanduser())
    for name in (raw, raw + ".yaml"):
        candidates.append(_recipes_root() / name)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    known = list_recipes()
    close = difflib.get_close_matches(raw.removesuffix(".yaml"), known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(f"recipe {raw!r} not found: no such file and no built-in recipe of that name{hint} "
                      f"(built-in recipes: {', '.join(known) or 'none'})")


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from e
    except Exception as e:  # yaml.YAMLError and friends
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
    if cfg is None:
        return OmegaConf.create({})
    if not isinstance(cfg, DictConfig):
        raise RecipeError(f"recipe {path} must be a mapping at the top level, got a {type(cfg).__name__}")
    return cfg


def _compose(path: Path, chain: Tuple[Path, ...], origins: List[Tuple[str, DictConfig]]) -> DictConfig:
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise RecipeError(f"recipe inheritance cycle: {cycle}")
    own = _read_yaml(path)
    bases = own.pop(BASE_KEY, None) if BASE_KEY in own else None
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif isinstance(bases, ListConfig) and all(isinstance(b, str) for b in bases):
        bases = list(bases)
    else:
        raise RecipeError(f"recipe {path}: '{BASE_KEY}' must be a recipe name or a list of names, got {bases!r}")
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, _compose(resolve_recipe(base, path.parent), chain + (path,), origins))
    origins.append((str(path), own))
    return OmegaConf.merge(merged, own)


# -- overrides --------------------------------------------------------------------------------
def _dotted_keys(node: Any, prefix: str = "") -> List[str]:
    out = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{prefix}.{key}" if prefix else str(key)
            out.append(full)
            out.extend(_dotted_keys(node._get_node(key), full))
    return out


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        # keys() rather than `in`: OmegaConf answers False for `in` on mandatory (???) values
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def apply_overrides(cfg: DictConfig, overrides: Iterable[str], source: str = "recipe") -> DictConfig:
    """Merge dot-list overrides into ``cfg`` (returns a new config).

    ``a.b=v`` replaces an existing key; ``+a.b=v`` adds a new one.  Overriding a key the recipe
    does not have is a :class:`RecipeError` naming the key, ``source`` and close matches.
    """
    overrides = list(overrides)
    plain = []
    known = _dotted_keys(cfg)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value (or +key=value to add a key)")
        key, value = item.split("=", 1)
        key = key.strip()
        add = key.startswith("+")
        key = key.lstrip("+")
        if not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {item!r} has an empty key")
        if not add and not _has_key(cfg, key):
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise RecipeError(f"override {item!r}: key '{key}' is not in {source}.{hint} "
                              f"Prefix it with '+' (+{key}=...) to add a new key.")
        plain.append(f"{key}={value}")
    if not plain:
        return cfg
    try:
        patch = OmegaConf.from_dotlist(plain)
        return OmegaConf.merge(cfg, patch)
    except OmegaConfBaseException as e:
        raise RecipeError(f"cannot apply overrides {overrides} to {source}: {e}") from e


# -- loading ----------------------------------------------------------------------------------
def load_recipe(path_or_name: PathLike, overrides: Sequence[str] = (), schema: Any = None) -> DictConfig:
    """Load a recipe (path or built-in name), compose its bases, apply overrides and validate.

    Args:
        path_or_name: a YAML file or a built-in name such as ``"var/quickstart"``.
        overrides: dot-list strings (``"trainer.max_steps=10"``, ``"+new.key=1"``).
        schema: the allowed keys and types (see the module docstring); ``None`` skips validation.

    Returns the merged ``DictConfig``; interpolations (``${...}``) are kept and resolve on access.
    Errors are :class:`RecipeError` naming the file and the dotted key.
    """
    path = resolve_recipe(path_or_name)
    origins: List[Tuple[str, DictConfig]] = []
    cfg = _compose(path, (), origins)
    source = str(path) if len(origins) == 1 else f"{path} (with bases {', '.join(o for o, _ in origins[:-1])})"
    cfg = apply_overrides(cfg, overrides, source)
    if overrides:
        origins.append(("the command-line overrides", OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])))
    if schema is not None:
        validate(cfg, schema, source, origins=origins)
    return cfg


# -- validation -------------------------------------------------------------------------------
def _origin_of(key: str, origins: Sequence[Tuple[str, DictConfig]], default: str) -> str:
    # The last file (or the overrides) that sets the key wins the merge, so it is the one to fix.
    for name, cfg in reversed(list(origins)):
        if _has_key(cfg, key):
            return name
    return default


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _fields_of(schema: Any) -> Optional[Dict[str, Any]]:
    """Key -> sub-schema for dict and dataclass schemas, None for leaf types."""
    if isinstance(schema, Mapping):
        return dict(schema)
    if dataclasses.is_dataclass(schema) and isinstance(schema, type):
        hints = typing.get_type_hints(schema)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(schema)}
    return None


def _check(value: Any, schema: Any, key: str, where: Callable[[str], str]) -> None:
    if schema is Any or schema is _ANY or schema is dict and isinstance(value, Mapping):
        return
    if isinstance(schema, Switch) and (value is None or isinstance(value, bool)):
        return
    fields = _fields_of(schema)
    if fields is not None:
        if value is None and isinstance(schema, type):
            raise RecipeError(f"{where(key)}: '{key}' is null, expected a {schema.__name__} section")
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where(key)}: '{key}' must be a section (mapping), got {value!r}")
        wildcard = fields.get("*", None)
        for sub, sub_value in value.items():
            full = f"{key}.{sub}" if key else str(sub)
            if sub in fields and sub != "*":
                _check(sub_value, fields[sub], full, where)
            elif "*" in fields:
                _check(sub_value, wildcard, full, where)
            else:
                allowed = sorted(k for k in fields if k != "*")
                close = difflib.get_close_matches(str(sub), allowed, n=3)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise RecipeError(f"{where(full)}: unknown key '{full}'.{hint} "
                                  f"Allowed keys{' in ' + key if key else ''}: {', '.join(allowed)}")
        return
    if not _matches(value, schema):
        raise RecipeError(f"{where(key)}: '{key}' = {value!r} ({type(value).__name__}) does not match "
                          f"the expected type {_type_name(schema)}")
    # Recurse into containers whose element types are given.
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if origin is Union:
        for arg in args:
            if _matches(value, arg):
                if _fields_of(arg) is not None or typing.get_origin(arg) is not None:
                    _check(value, arg, key, where)
                return


def _matches(value: Any, tp: Any) -> bool:
    """Shallow-then-deep type test of a plain (resolved) value against a schema type."""
    if tp is Any or tp is _ANY:
        return True
    if tp is None or tp is type(None):
        return value is None
    if _fields_of(tp) is not None:
        return isinstance(value, Mapping)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            return all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    raise TypeError(f"unsupported schema type {tp!r}")


def to_dict(cfg: Any, source: str = "recipe") -> Any:
    """A resolved plain-Python copy of a config node (dicts, lists, scalars)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise RecipeError(f"{source}: cannot resolve{f' key {key!r}' if key else ''}: {e}") from e
    return cfg


def validate(cfg: Any, schema: Any, source: str = "recipe",
             origins: Optional[Sequence[Tuple[str, DictConfig]]] = None) -> None:
    """Check every key of ``cfg`` against ``schema``; raise :class:`RecipeError` on the first problem.

    Unknown keys are reported with their full dotted name and the file that sets them (from
    ``origins``, the per-file configs that :func:`load_recipe` merged, else ``source``); wrong
    types with the key, the value and the expected type.  Missing keys are not errors: the code
    that consumes a section supplies defaults.
    """
    value = to_dict(cfg, source)

    def where(key: str) -> str:
        return _origin_of(key, origins, source) if origins else source

    _check(value, schema, "", where)


# -- keyword-argument sections ----------------------------------------------------------------
def check_kwargs(fn: Callable, kwargs: Any, where: str, prefix: str = "",
                 exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """Check that ``fn`` (a function or class) accepts every keyword in ``kwargs``.

    Returns ``kwargs`` as a resolved plain dict.  An unknown name is a :class:`RecipeError`
    naming ``where`` (e.g. ``"recipe x.yaml"``), the dotted key (``prefix.name``), close matches
    and every valid name (``exclude``: names that are not for the user to set).  Callables taking
    ``**kwargs`` accept anything.  Missing required arguments are left to the call itself, since
    the caller often supplies some of them.
    """
    kwargs = to_dict(kwargs, where) if kwargs is not None else {}
    if not isinstance(kwargs, Mapping):
        raise RecipeError(f"{where}: expected a mapping of keyword arguments, got {kwargs!r}")
    kwargs = dict(kwargs)
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return kwargs  # builtins without a signature: let the call decide
    params = [p for name, p in sig.parameters.items() if name != "self"]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    valid = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
             and p.name not in exclude]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        name = getattr(fn, "__qualname__", repr(fn)).removesuffix(".__init__")
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=3)
            key = f"{prefix}.{k}" if prefix else k
            parts.append(f"'{key}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise RecipeError(f"{where}: unknown key {', '.join(parts)}: {name} does not take it. "
                          f"Valid names: {', '.join(valid)}")
    return kwargs


def trainer_kwargs(trainer_cfg: Any, where: str = "recipe") -> Dict[str, Any]:
    """``lightning.Trainer`` keyword arguments from a recipe section, checked against its signature."""
    from lightning.pytorch import Trainer

    return check_kwargs(Trainer, trainer_cfg, where, prefix="trainer")


# -- saving -----------------------------------------------------------------------------------
def save_recipe(cfg: Any, path: PathLike) -> Path:
    """Write the resolved recipe as YAML (atomically), e.g. next to a run's outputs.

    Interpolations are resolved, so the file records the values the run actually used.
    """
    from ..io import atomic_write

    container = to_dict(cfg, str(path)) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    text = OmegaConf.to_yaml(OmegaConf.create(container))
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
