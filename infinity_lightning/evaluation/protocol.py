"""Evaluation protocols: frozen lists of (prompt, spec, seed) items, versioned JSON files.

A protocol file reads::

    {"name": "shapes", "version": 1,
     "world": {"image_size": 64, "colours": [...], "shapes": [...], "holdout_pairs": ["red square", ...],
               "background": "gray", "max_count": 3},
     "seed_range": [50000000, 51000000],
     "items": [{"id": "single_object/000", "category": "single_object", "prompt": "a red circle",
                "spec": {"objects": [{"colour": "red", "shape": "circle"}]}, "seed": 50000000}, ...]}

``category`` is one of :data:`~.checker.CATEGORIES` or ``"held_out_pairs"``; ``spec`` is what
the checker judges (:mod:`.specs`; the prompt is only what the model reads, so a protocol may
phrase prompts its own way); ``seed`` is the generation seed of the item and lies in
``seed_range``.  :func:`load_protocol` validates any file of this format and names the item and
field at fault.

The shipped protocol ``protocols/shapes_v1.json`` is the output of :func:`build_shapes_protocol`
with its defaults (a test keeps the two identical).  Seeds: training and tuning of the quick
start use sampling and validation seeds below 2,000,000 and shapes-generator indices in
[2,000,000, 4,000,000) (:data:`TUNING_SEED_RANGE` covers both); evaluation seeds lie in
[50,000,000, 51,000,000) (:data:`EVALUATION_SEED_RANGE`), disjoint from it, so no recipe was
tuned on the images a protocol scores.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from infinity_lightning.datamodules.shapes import PALETTE, POSITIONS, RELATIONS, SHAPE_NAMES

from .checker import GROUPS, HELD_OUT_GROUP
from .specs import ObjectSpec, PromptSpec, SpecError, prompt_for, spec_from_dict

__all__ = ["Protocol", "ProtocolItem", "ProtocolError", "build_shapes_protocol", "protocol_to_json",
           "protocol_from_dict", "load_protocol", "default_protocol_path", "EVALUATION_SEED_RANGE",
           "TUNING_SEED_RANGE", "QUICKSTART_WORLD"]

#: Seeds and generator indices recipes are tuned with (half-open): the quick start samples and
#: validates with seeds below 2,000,000 and draws scenes at generator indices [2,000,000, 4,000,000).
TUNING_SEED_RANGE: Tuple[int, int] = (0, 4_000_000)
#: Seeds of evaluation protocols (half-open), disjoint from :data:`TUNING_SEED_RANGE`.
EVALUATION_SEED_RANGE: Tuple[int, int] = (50_000_000, 51_000_000)

#: The world of the quick start (recipes/var/quickstart.yaml): 64 px, eight colours, three shapes,
#: three held-out colour-shape pairs, gray background, counts up to three.
QUICKSTART_WORLD: Dict[str, Any] = {
    "image_size": 64,
    "colours": ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"],
    "shapes": ["circle", "square", "triangle"],
    "holdout_pairs": ["red square", "green triangle", "blue circle"],
    "background": "gray",
    "max_count": 3,
}

_PROTOCOL_DIR = Path(__file__).resolve().parent / "protocols"


def default_protocol_path() -> Path:
    """The shipped protocol file (``protocols/shapes_v1.json`` inside this package)."""
    return _PROTOCOL_DIR / "shapes_v1.json"


class ProtocolError(ValueError):
    """A protocol file or dict that does not follow the format; the message names the file, the
    item and the field."""


@dataclass(frozen=True)
class ProtocolItem:
    """One evaluation item: ``id``, ``category`` (a group of :data:`~.checker.GROUPS`), the
    ``prompt`` the model reads, the ``spec`` the checker judges and the generation ``seed``."""

    id: str
    category: str
    prompt: str
    spec: PromptSpec
    seed: int

    def to_dict(self) -> Dict[str, Any]:
        """The protocol-file form."""
        return {"id": self.id, "category": self.category, "prompt": self.prompt, "spec": self.spec.to_dict(),
                "seed": self.seed}


@dataclass(frozen=True)
class Protocol:
    """A loaded, validated protocol (see the module docstring for the fields)."""

    name: str
    version: int
    world: Mapping[str, Any]
    seed_range: Tuple[int, int]
    items: Tuple[ProtocolItem, ...]
    source: str = field(default="<dict>", compare=False)

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the protocol expects."""
        return int(self.world["image_size"])

    def groups(self) -> List[str]:
        """Groups present, in :data:`~.checker.GROUPS` order."""
        present = {it.category for it in self.items}
        return [g for g in GROUPS if g in present]

    def items_of(self, group: str) -> List[ProtocolItem]:
        """Items of one group, in file order."""
        return [it for it in self.items if it.category == group]

    def with_items(self, items: Iterable[ProtocolItem]) -> "Protocol":
        """The same protocol restricted to ``items`` (a subset)."""
        return Protocol(self.name, self.version, self.world, self.seed_range, tuple(items), self.source)

    def to_dict(self) -> Dict[str, Any]:
        """The protocol-file form."""
        return {"name": self.name, "version": self.version, "world": dict(self.world),
                "seed_range": list(self.seed_range), "items": [it.to_dict() for it in self.items]}


# ------------------------------------------------------------------------------------------------
# the builder
# ------------------------------------------------------------------------------------------------
def _cycle(values: Sequence[Any], n: int) -> List[Any]:
    return [values[i % len(values)] for i in range(n)]


def _shuffled(values: Sequence[Any], rng: np.random.Generator) -> List[Any]:
    return [values[int(k)] for k in rng.permutation(len(values))]


def _pair_name(pair: Tuple[str, str]) -> str:
    return f"{pair[0]} {pair[1]}"


def build_shapes_protocol(*, name: str = "shapes", version: int = 1, world: Optional[Mapping[str, Any]] = None,
                          per_category: int = 72, held_out_per_pair: int = 16,
                          seed_range: Tuple[int, int] = EVALUATION_SEED_RANGE) -> Dict[str, Any]:
    """Build a shapes protocol deterministically (the shipped file is this with its defaults).

    ``per_category`` items in each of the six categories and ``held_out_per_pair`` items per
    held-out pair (defaults: 6 x 72 + 3 x 16 = 480 items), drawn from ``world`` (default
    :data:`QUICKSTART_WORLD`).  The ``version`` seeds every choice; item ``i`` (in file order)
    uses generation seed ``seed_range[0] + i``.  Composition:

    * ``single_object``: the trainable colour-shape pairs (not held out) in turn, "a red circle";
    * ``colours``: the colours in turn, each with a shape it is trained with, "a red circle";
    * ``counting``: counts 2 .. ``max_count`` in turn over the trainable pairs, "two red circles";
    * ``two_objects``: two trainable pairs that share their colour or their shape, so naming
      both is all that is asked ("a red circle and a red square");
    * ``colour_attribution``: two pairs differing in colour and in shape whose swapped binding is
      trainable too, so only binding each colour to its shape passes ("a red circle and a blue
      square" against a blue circle and a red square);
    * ``position``: half grid positions (the nine cells in turn, "a red circle at the top left"),
      half relations (the four in turn, "a red circle to the left of a blue square");
    * ``held_out_pairs``: the held-out pairs, single objects.

    Returns the protocol-file dict (write it with :func:`protocol_to_json`).
    """
    world = dict(QUICKSTART_WORLD if world is None else world)
    checked = protocol_from_dict({"name": name, "version": version, "world": world,
                                  "seed_range": list(seed_range), "items": []})
    world = dict(checked.world)
    colours, shapes = list(world["colours"]), list(world["shapes"])
    holdout = {tuple(p.split()) for p in world["holdout_pairs"]}
    max_count = int(world["max_count"])
    pairs = [(c, s) for c in colours for s in shapes if (c, s) not in holdout]
    if per_category < 1 or held_out_per_pair < 0:
        raise ValueError("per_category must be >= 1 and held_out_per_pair >= 0")
    rng = np.random.default_rng([int(version), 0xE7A1])

    def obj(pair: Tuple[str, str], **kw: Any) -> ObjectSpec:
        return ObjectSpec(pair[0], pair[1], **kw)

    specs: Dict[str, List[PromptSpec]] = {}
    specs["single_object"] = [PromptSpec((obj(p),)) for p in _cycle(_shuffled(pairs, rng), per_category)]
    by_colour = {c: [s for s in shapes if (c, s) not in holdout] for c in colours}
    specs["colours"] = [PromptSpec((ObjectSpec(c, by_colour[c][(i // len(colours)) % len(by_colour[c])]),))
                        for i, c in enumerate(_cycle(_shuffled(colours, rng), per_category))]
    counts = list(range(2, max_count + 1))
    specs["counting"] = [PromptSpec((obj(p, count=counts[i % len(counts)]),))
                         for i, p in enumerate(_cycle(_shuffled(pairs, rng), per_category))]
    sharing = [(a, b) for a, b in combinations(pairs, 2) if (a[0] == b[0]) != (a[1] == b[1])]
    specs["two_objects"] = [PromptSpec((obj(a), obj(b)) if rng.random() < 0.5 else (obj(b), obj(a)))
                            for a, b in _cycle(_shuffled(sharing, rng), per_category)]
    binding = [(a, b) for a, b in combinations(pairs, 2)
               if a[0] != b[0] and a[1] != b[1] and (a[0], b[1]) in pairs and (b[0], a[1]) in pairs]
    specs["colour_attribution"] = [PromptSpec((obj(a), obj(b)) if rng.random() < 0.5 else (obj(b), obj(a)))
                                   for a, b in _cycle(_shuffled(binding, rng), per_category)]
    n_grid = (per_category + 1) // 2
    grid_pairs = _cycle(_shuffled(pairs, rng), n_grid)
    cells = _cycle(list(POSITIONS), n_grid)
    position = [PromptSpec((obj(p, position=cell),)) for p, cell in zip(grid_pairs, cells)]
    distinct = [(a, b) for a in pairs for b in pairs if a != b]
    rel_pairs = _cycle(_shuffled(distinct, rng), per_category - n_grid)
    relations = _cycle(list(RELATIONS), per_category - n_grid)
    position += [PromptSpec((obj(a), obj(b)), rel) for (a, b), rel in zip(rel_pairs, relations)]
    specs["position"] = position
    specs[HELD_OUT_GROUP] = [PromptSpec((obj(p),)) for p in sorted(holdout) for _ in range(held_out_per_pair)]

    items: List[Dict[str, Any]] = []
    for group in GROUPS:
        for j, spec in enumerate(specs[group]):
            items.append(ProtocolItem(f"{group}/{j:03d}", group, prompt_for(spec), spec,
                                      int(seed_range[0]) + len(items)).to_dict())
    data = {"name": name, "version": int(version), "world": world, "seed_range": [int(v) for v in seed_range],
            "items": items}
    protocol_from_dict(data)  # the builder's output passes its own validation
    return data


def protocol_to_json(data: Mapping[str, Any]) -> str:
    """The canonical text of a protocol file: header fields indented, one item per line."""
    head = {k: data[k] for k in ("name", "version", "world", "seed_range")}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
    lines.append('  "items": [')
    items = [json.dumps(it) for it in data["items"]]
    lines += [f"    {t}," for t in items[:-1]] + ([f"    {items[-1]}"] if items else [])
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# loading and validation
# ------------------------------------------------------------------------------------------------
def _world(data: Any, fail) -> Dict[str, Any]:
    if not isinstance(data, Mapping):
        fail("world", "expected an object")
    known = {"image_size", "colours", "shapes", "holdout_pairs", "background", "max_count"}
    unknown = sorted(set(data) - known)
    if unknown:
        fail(f"world.{unknown[0]}", f"unknown key; known keys: {sorted(known)}")
    size = data.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        fail("world.image_size", f"expected an integer >= 16, got {size!r}")
    out: Dict[str, Any] = {"image_size": size}
    for key, known_names in (("colours", PALETTE), ("shapes", SHAPE_NAMES)):
        names = data.get(key)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            fail(f"world.{key}", "expected a non-empty list of names")
        bad = [n for n in names if n not in known_names]
        if bad:
            fail(f"world.{key}", f"unknown name {bad[0]!r}; known: {list(known_names)}")
        out[key] = list(names)
    holdout = data.get("holdout_pairs", [])
    if not isinstance(holdout, list):
        fail("world.holdout_pairs", "expected a list of 'colour shape' strings")
    for k, p in enumerate(holdout):
        parts = p.split() if isinstance(p, str) else []
        if len(parts) != 2 or parts[0] not in out["colours"] or parts[1] not in out["shapes"]:
            fail(f"world.holdout_pairs[{k}]", f"expected 'colour shape' of the world's colours and shapes, got {p!r}")
    out["holdout_pairs"] = list(holdout)
    background = data.get("background", "gray")
    if background not in PALETTE or background in out["colours"]:
        fail("world.background", f"expected a palette colour that is not an object colour, got {background!r}")
    out["background"] = background
    max_count = data.get("max_count", 3)
    if isinstance(max_count, bool) or not isinstance(max_count, int) or not 2 <= max_count <= 4:
        fail("world.max_count", f"expected an integer from 2 to 4, got {max_count!r}")
    out["max_count"] = max_count
    return out


def _item_spec_fits(item: ProtocolItem, world: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """(field, message) when an item's spec does not fit its category or the world."""
    holdout = {tuple(p.split()) for p in world["holdout_pairs"]}
    for k, o in enumerate(item.spec.objects):
        if o.colour not in world["colours"]:
            return f"spec.objects[{k}].colour", f"{o.colour!r} is not a colour of the world {world['colours']}"
        if o.shape not in world["shapes"]:
            return f"spec.objects[{k}].shape", f"{o.shape!r} is not a shape of the world {world['shapes']}"
        if o.count > world["max_count"]:
            return f"spec.objects[{k}].count", f"{o.count} exceeds the world's max_count {world['max_count']}"
        if (o.pair in holdout) != (item.category == HELD_OUT_GROUP):
            return (f"spec.objects[{k}]", f"held-out pair {_pair_name(o.pair)!r} outside the held_out_pairs group"
                    if o.pair in holdout else f"{_pair_name(o.pair)!r} is not a held-out pair of the world")
    objs, cat = item.spec.objects, item.category
    one = len(objs) == 1 and objs[0].count == 1
    rules = {
        "single_object": one and objs[0].position is None,
        HELD_OUT_GROUP: one and objs[0].position is None,
        "colours": one and objs[0].position is None,
        "counting": len(objs) == 1 and objs[0].count > 1,
        "two_objects": len(objs) == 2 and all(o.count == 1 and o.position is None for o in objs)
        and item.spec.relation is None,
        "colour_attribution": len(objs) == 2 and all(o.count == 1 and o.position is None for o in objs)
        and item.spec.relation is None and objs[0].colour != objs[1].colour and objs[0].shape != objs[1].shape,
        "position": item.spec.relation is not None or (one and objs[0].position is not None),
    }
    if not rules[cat]:
        expected = {
            "single_object": "one object of count 1 without a position",
            HELD_OUT_GROUP: "one object of count 1 without a position",
            "colours": "one object of count 1 without a position",
            "counting": "one object kind with a count of at least 2",
            "two_objects": "two objects of count 1, no positions or relation",
            "colour_attribution": "two objects of count 1 differing in colour and shape, no positions or relation",
            "position": "a relation between two objects, or one object with a grid position",
        }[cat]
        return "spec", f"does not fit category {cat!r}: expected {expected}"
    return None


def protocol_from_dict(data: Any, source: str = "<dict>") -> Protocol:
    """Validate the protocol-file form and build a :class:`Protocol`; raises
    :class:`ProtocolError` with a one-line message naming ``source``, the item and the field."""

    def fail(where: str, message: str, item: Optional[str] = None) -> None:
        at = f"item {item}: " if item is not None else ""
        raise ProtocolError(f"protocol {source}: {at}field {where!r}: {message}")

    if not isinstance(data, Mapping):
        raise ProtocolError(f"protocol {source}: expected a JSON object at the top level")
    known = {"name", "version", "world", "seed_range", "items"}
    missing = sorted(known - set(data))
    if missing:
        fail(missing[0], "missing")
    unknown = sorted(set(data) - known)
    if unknown:
        fail(unknown[0], f"unknown key; known keys: {sorted(known)}")
    if not isinstance(data["name"], str) or not data["name"]:
        fail("name", "expected a non-empty string")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        fail("version", f"expected a positive integer, got {version!r}")
    world = _world(data["world"], fail)
    rng = data["seed_range"]
    if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in rng) or not 0 <= rng[0] < rng[1]):
        fail("seed_range", f"expected [lo, hi] with 0 <= lo < hi, got {rng!r}")
    lo, hi = rng
    items_data = data["items"]
    if not isinstance(items_data, list):
        fail("items", "expected a list")
    items: List[ProtocolItem] = []
    seen_ids, seen_seeds = set(), set()
    for k, raw in enumerate(items_data):
        label = f"#{k}"
        if not isinstance(raw, Mapping):
            fail("", "expected an object", label)
        if isinstance(raw.get("id"), str):
            label = f"#{k} ({raw['id']!r})"
        for key in ("id", "category", "prompt", "spec", "seed"):
            if key not in raw:
                fail(key, "missing", label)
        extra = sorted(set(raw) - {"id", "category", "prompt", "spec", "seed"})
        if extra:
            fail(extra[0], "unknown key; known keys: id, category, prompt, spec, seed", label)
        if not isinstance(raw["id"], str) or not raw["id"]:
            fail("id", "expected a non-empty string", label)
        if raw["id"] in seen_ids:
            fail("id", f"duplicate id {raw['id']!r}", label)
        seen_ids.add(raw["id"])
        if raw["category"] not in GROUPS:
            fail("category", f"unknown category {raw['category']!r}; known: {list(GROUPS)}", label)
        if not isinstance(raw["prompt"], str) or not raw["prompt"].strip():
            fail("prompt", "expected a non-empty string", label)
        seed = raw["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not lo <= seed < hi:
            fail("seed", f"expected an integer in seed_range [{lo}, {hi}), got {seed!r}", label)
        if seed in seen_seeds:
            fail("seed", f"seed {seed} is used by another item", label)
        seen_seeds.add(seed)
        try:
            spec = spec_from_dict(raw["spec"])
        except SpecError as e:
            fail(f"spec.{e.field}" if e.field != "spec" else "spec", e.detail, label)
        item = ProtocolItem(raw["id"], raw["category"], raw["prompt"], spec, seed)
        problem = _item_spec_fits(item, world)
        if problem:
            fail(problem[0], problem[1], label)
        items.append(item)
    return Protocol(data["name"], version, world, (lo, hi), tuple(items), source)


def load_protocol(path: Union[None, str, os.PathLike] = None) -> Protocol:
    """Read and validate a protocol file (default: the shipped :func:`default_protocol_path`)."""
    path = Path(path) if path is not None else default_protocol_path()
    if not path.is_file():
        raise ProtocolError(f"protocol file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"protocol {path}: not valid JSON ({e})") from None
    return protocol_from_dict(data, source=str(path))
