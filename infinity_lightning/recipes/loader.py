"""Recipes: OmegaConf YAML files with inheritance, dot-list overrides and strict validation.

A recipe is a YAML file, given by path or by a built-in name (``"var/quickstart"`` is
``recipes/var/quickstart.yaml`` in the installed package data).  A top-level ``base`` key (a name
or path, or a list of them) names recipes that are loaded first; the file's own keys are merged on
top (nested mappings merge key by key, everything else replaces).  A relative ``base`` path is
looked up next to the file first, then among the built-in recipes.

Overrides are OmegaConf dot-list strings, applied in order:

* ``trainer.max_steps=100`` sets a key the recipe already has (a typo is an error that lists
  close matches); ``+trainer.foo=1`` adds a new key on purpose.  Values are parsed as YAML (``1``
  is an int, ``[1,2]`` a list, ``null`` None).
* ``~data.seed`` deletes a key (the code that reads the section then uses its default).
* ``data={name: folder, data_dir: imgs}`` (a mapping value) replaces the whole key: nothing of
  the old value is kept, where a file's nested mapping merges key by key.
* A section that chooses a component by its ``name`` (``data.name``: the DataModule) starts over
  when the name changes, in an override or in a file that changes its base's choice: the keys
  the new component does not take are dropped (a log line lists them), the keys both take
  (``batch_size``, ``num_workers``, ``seed``) are kept, and keys set by the overrides stay.  The
  ``components`` argument of :func:`load_recipe` says which keys a component takes; without it
  every other key of the section is dropped.  Keys the section's component takes may be set
  without ``+``.

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
import logging
import os
import typing
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Collection, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Tuple, Union)

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import UserError

if TYPE_CHECKING:
    from ..io import PathLike

log = logging.getLogger(__name__)

#: ``components(section, name)``: the keys the component ``name`` of a recipe section takes, or
#: None when the name is unknown (see :func:`apply_overrides`).
Components = Callable[[str, str], Optional[Collection[str]]]

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
    "SECTIONS",
    "COMPONENT_KEY",
]

BASE_KEY = "base"
#: The key of a section that names the component it configures (``data.name``).
COMPONENT_KEY = "name"
RECIPE_PACKAGE = "infinity_lightning.recipes_data"
_ANY = object()  # marker: anything is accepted below this point


class RecipeError(UserError, ValueError):
    """A recipe file, override or section is invalid; the message names the file and the key."""


class Switch(dict):
    """A section schema (key -> schema) whose value may also be ``true`` (on, with defaults),
    ``false`` or ``null`` (off): the schema of a switchable component such as a callback."""


#: The sections of a training recipe and where their keys are documented (``fit --help``; the
#: checks are :func:`infinity_lightning.recipes.recipe_schema`).
SECTIONS: Dict[str, str] = {
    "kind": "var (the bitwise VAR transformer) or tokenizer (the BSQ-VAE); default: the recipe's folder",
    "seed": "seed of the networks, the data order and the sample images",
    "output_dir": "the run folder (recipe.yaml, tb/, checkpoints/, samples/; --output-dir overrides it)",
    "ckpt_path": "checkpoint to resume from: a file, 'last' or 'auto' (--ckpt-path overrides it)",
    "schedule": "resolution (pixel budget 0.06M ... 1M, pixel size, or [[h, w], ...] grids) and, for tokenizers, "
                "mode: infinity_lightning.scales.resolve, docs/model.md",
    "model": "the networks: infinity_lightning.recipes.build.VAR_MODEL / TOKENIZER_MODEL, docs/recipes.md",
    "data": "name (infinity_lightning.datamodules.DATAMODULES) and that DataModule's arguments",
    "module": "arguments of infinity_lightning.lit.BitwiseVARModule / BSQTokenizerModule",
    "optim": "infinity_lightning.lit.optim.OptimConfig (lr or tblr, betas, schedule, warm-up, grad_clip)",
    "sampling": "(var) infinity_lightning.sampling.SamplingConfig of the sample images",
    "trainer": "lightning.Trainer arguments; strategy: ddp or fsdp2 (docs/distributed.md)",
    "callbacks": "name: {arguments} of infinity_lightning.callbacks.CALLBACKS (true: defaults, null: off)",
}


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
    hint = (f"; did you mean {', '.join(close)}?" if close
            else f" (built-in recipes: {', '.join(known) or 'none'})")
    raise RecipeError(f"recipe {raw!r} not found: no such file and no built-in recipe of that name{hint}")


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


def _compose(path: Path, chain: Tuple[Path, ...], origins: List[Tuple[str, DictConfig]],
             components: Optional[Components] = None) -> DictConfig:
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
        merged = OmegaConf.merge(merged, _compose(resolve_recipe(base, path.parent), chain + (path,), origins,
                                                  components))
    # A file that picks another component for a section starts that section over.
    for section in list(own.keys()):
        node = own._get_node(section)
        if isinstance(node, DictConfig) and COMPONENT_KEY in node.keys() and _has_key(merged, str(section)):
            new_name = node._get_node(COMPONENT_KEY)._value()
            _restart_section(merged, str(section), new_name, set(node.keys()), components, str(path))
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


def _node(cfg: DictConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node._get_node(part)
    return node


def _parent_and_leaf(cfg: DictConfig, dotted: str) -> Tuple[Any, str]:
    parent, _, leaf = dotted.rpartition(".")
    return (_node(cfg, parent) if parent else cfg), leaf


def _restart_section(cfg: DictConfig, section: str, new_name: Any, keep: Collection[str],
                     components: Optional[Components], source: str) -> None:
    """Start ``cfg[section]`` over for the component ``new_name`` (in place): keep the keys the
    component takes (by ``components``; none without it) and the keys in ``keep``."""
    node = _node(cfg, section)
    if not isinstance(node, DictConfig) or COMPONENT_KEY not in node.keys():
        return
    old_name = node._get_node(COMPONENT_KEY)._value()
    if old_name == new_name or not isinstance(new_name, str):
        return
    accepted = components(section, new_name) if components is not None else ()
    if accepted is None:  # an unknown component: validation names it with the choices
        return
    dropped = [str(k) for k in node.keys() if k != COMPONENT_KEY and k not in accepted and k not in keep]
    for key in dropped:
        del node[key]
    if dropped:
        log.info("%s: %s.%s %r replaces %r, so %s %s dropped (not arguments of %r)", source, section, COMPONENT_KEY,
                 new_name, old_name, ", ".join(f"{section}.{k}" for k in dropped), "is" if len(dropped) == 1 else "are",
                 new_name)


def _section_takes(cfg: DictConfig, dotted: str, components: Optional[Components]) -> bool:
    """Whether ``dotted`` (``section.key``) is a key that the section's component takes."""
    section, _, key = dotted.rpartition(".")
    if components is None or not section or not _has_key(cfg, section):
        return False
    node = _node(cfg, section)
    if not isinstance(node, DictConfig) or COMPONENT_KEY not in node.keys():
        return False
    accepted = components(section, node._get_node(COMPONENT_KEY)._value())
    return accepted is not None and key in accepted


def _parse_override(item: Any) -> Tuple[str, str, Optional[str]]:
    """``(op, key, value)``: op is ``set``, ``add`` (``+key=value``) or ``delete`` (``~key``)."""
    if not isinstance(item, str):
        raise RecipeError(f"override {item!r} must be a string key=value (or +key=value, ~key)")
    text = item.strip()
    if text.startswith("~"):
        key, value, op = text[1:].split("=", 1)[0].strip(), None, "delete"
        if "=" in text:
            raise RecipeError(f"override {item!r}: '~key' deletes a key and takes no value")
    elif "=" in text:
        key, value = text.split("=", 1)
        key = key.strip()
        op = "add" if key.startswith("+") else "set"
        key = key.lstrip("+")
    else:
        quoting = ("; a value with spaces must be quoted in the shell, e.g. 'data={name: folder, data_dir: imgs}'"
                   if text.endswith(("}", "]")) else "")
        raise RecipeError(f"override {item!r} must look like key=value (or +key=value to add a key, ~key to delete "
                          f"one){quoting}")
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r} has an empty key")
    return op, key, value


def apply_overrides(cfg: DictConfig, overrides: Iterable[str], source: str = "recipe",
                    components: Optional[Components] = None) -> DictConfig:
    """Apply dot-list overrides to ``cfg`` in order (returns a new config).

    ``a.b=v`` replaces an existing key (a mapping value replaces the whole key); ``+a.b=v`` adds a
    new one; ``~a.b`` deletes one.  Setting or deleting a key the recipe does not have is a
    :class:`RecipeError` naming the key, ``source`` and close matches.  A new component name
    (``data.name=folder``) starts its section over (see the module docstring).
    """
    overrides = list(overrides)
    parsed = [_parse_override(item) for item in overrides]
    if not parsed:
        return cfg
    cfg = cfg.copy()
    known = _dotted_keys(cfg)
    touched = set()
    for item, (op, key, value) in zip(overrides, parsed):
        exists = _has_key(cfg, key)
        if not exists and (op == "delete" or (op == "set" and not _section_takes(cfg, key, components))):
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            fix = "" if op == "delete" else f" Prefix it with '+' (+{key}=...) to add a new key."
            raise RecipeError(f"override {item!r}: key '{key}' is not in {source}.{hint}{fix}")
        if op == "delete":
            parent, leaf = _parent_and_leaf(cfg, key)
            del parent[leaf]
            touched.discard(key)
            continue
        try:
            patch = OmegaConf.from_dotlist([f"{key}={value}"])
            new_value = _node(patch, key)
            section, _, leaf = key.rpartition(".")
            if leaf == COMPONENT_KEY and section and exists:
                keep = {k.split(".", 1)[1].split(".")[0] for k in touched if k.startswith(section + ".")}
                _restart_section(cfg, section, new_value._value(), keep, components, "the command-line overrides")
            if exists and isinstance(new_value, DictConfig):
                parent, leaf = _parent_and_leaf(cfg, key)
                del parent[leaf]  # a mapping replaces the whole key
            cfg = OmegaConf.merge(cfg, patch)
        except OmegaConfBaseException as e:
            raise RecipeError(f"cannot apply override {item!r} to {source}: {e}") from e
        touched.add(key)
    return cfg


# -- loading ----------------------------------------------------------------------------------
def load_recipe(path_or_name: PathLike, overrides: Sequence[str] = (), schema: Any = None,
                components: Optional[Components] = None) -> DictConfig:
    """Load a recipe (path or built-in name), compose its bases, apply overrides and validate.

    Args:
        path_or_name: a YAML file or a built-in name such as ``"var/quickstart"``.
        overrides: dot-list strings (``"trainer.max_steps=10"``, ``"+new.key=1"``, ``"~data.seed"``).
        schema: the allowed keys and types (see the module docstring); ``None`` skips validation.
        components: ``components(section, name)`` -> the keys that component takes (see the
            module docstring); used when a section's component changes.

    Returns the merged ``DictConfig``; interpolations (``${...}``) are kept and resolve on access.
    Errors are :class:`RecipeError` naming the file and the dotted key.
    """
    path = resolve_recipe(path_or_name)
    origins: List[Tuple[str, DictConfig]] = []
    cfg = _compose(path, (), origins, components)
    source = str(path) if len(origins) == 1 else f"{path} (with bases {', '.join(o for o, _ in origins[:-1])})"
    cfg = apply_overrides(cfg, overrides, source, components)
    settings = [o.strip().lstrip("+") for o in overrides if isinstance(o, str) and "=" in o and not o.strip().startswith("~")]
    if settings:
        try:
            origins.append(("the command-line overrides", OmegaConf.from_dotlist(settings)))
        except OmegaConfBaseException:  # already reported by apply_overrides
            pass
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
