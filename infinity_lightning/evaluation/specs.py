"""What a prompt of the shapes world asks for, as data: :class:`PromptSpec`.

A prompt names objects (a colour, a shape, a count, optionally a 3 x 3 grid position) and
optionally a relation between two of them.  The same structure is written into protocol files
(``{"objects": [{"colour": "red", "shape": "circle", "count": 2, "position": "top left"}],
"relation": "left of"}``), turned into the grammar's caption by :func:`prompt_for`, read back from
a caption by :func:`parse_prompt`, and drawn as a concrete scene by :func:`scene_for_spec`
(positive examples for calibration and tests).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from infinity_lightning.datamodules.shapes import (
    COUNT_WORDS,
    PALETTE,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    RELATIONS,
    SHAPE_NAMES,
    ShapeObject,
    ShapeSpec,
    cell_object,
    relation_cells,
)

__all__ = ["ObjectSpec", "PromptSpec", "spec_from_dict", "prompt_for", "parse_prompt", "scene_for_spec",
           "SpecError", "MAX_COUNT"]

#: Largest count a spec may ask for (the grammar's count words).
MAX_COUNT = max(COUNT_WORDS)


class SpecError(ValueError):
    """A malformed spec; ``field`` is the dotted path of the offending field (``objects[1].colour``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field!r}: {message}")
        self.field = field
        self.detail = message


@dataclass(frozen=True)
class ObjectSpec:
    """One named object: colour and shape names, how many of it, and its grid position (a key of
    :data:`~infinity_lightning.datamodules.shapes.POSITIONS`) or ``None``."""

    colour: str
    shape: str
    count: int = 1
    position: Optional[str] = None

    @property
    def pair(self) -> Tuple[str, str]:
        """``(colour, shape)``."""
        return self.colour, self.shape

    def to_dict(self) -> Dict[str, Any]:
        """The protocol-file form (``count`` and ``position`` only when set)."""
        out: Dict[str, Any] = {"colour": self.colour, "shape": self.shape}
        if self.count != 1:
            out["count"] = self.count
        if self.position is not None:
            out["position"] = self.position
        return out


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: its objects and, for two objects, an optional relation (a key of
    :data:`~infinity_lightning.datamodules.shapes.RELATIONS`: ``objects[0]`` stands in it to
    ``objects[1]``)."""

    objects: Tuple[ObjectSpec, ...]
    relation: Optional[str] = None

    @property
    def total_count(self) -> int:
        """Number of objects the scene should hold."""
        return sum(o.count for o in self.objects)

    def to_dict(self) -> Dict[str, Any]:
        """The protocol-file form."""
        out: Dict[str, Any] = {"objects": [o.to_dict() for o in self.objects]}
        if self.relation is not None:
            out["relation"] = self.relation
        return out


def _object_from_dict(data: Any, field: str) -> ObjectSpec:
    if not isinstance(data, Mapping):
        raise SpecError(field, f"expected an object with 'colour' and 'shape', got {type(data).__name__}")
    unknown = sorted(set(data) - {"colour", "shape", "count", "position"})
    if unknown:
        raise SpecError(f"{field}.{unknown[0]}", "unknown key; known keys: colour, shape, count, position")
    colour, shape = data.get("colour"), data.get("shape")
    if colour not in PALETTE:
        raise SpecError(f"{field}.colour", f"unknown colour {colour!r}; known: {sorted(PALETTE)}")
    if shape not in SHAPE_NAMES:
        raise SpecError(f"{field}.shape", f"unknown shape {shape!r}; known: {list(SHAPE_NAMES)}")
    count = data.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise SpecError(f"{field}.count", f"expected an integer from 1 to {MAX_COUNT}, got {count!r}")
    position = data.get("position")
    if position is not None and position not in POSITIONS:
        raise SpecError(f"{field}.position", f"unknown position {position!r}; known: {list(POSITIONS)}")
    if position is not None and count != 1:
        raise SpecError(f"{field}.position", "a grid position needs count 1")
    return ObjectSpec(colour, shape, count, position)


def spec_from_dict(data: Any) -> PromptSpec:
    """Validate and convert the protocol-file form of a spec; raises :class:`SpecError` naming the
    field at fault."""
    if isinstance(data, PromptSpec):
        return data
    if not isinstance(data, Mapping):
        raise SpecError("spec", f"expected an object with 'objects', got {type(data).__name__}")
    unknown = sorted(set(data) - {"objects", "relation"})
    if unknown:
        raise SpecError(unknown[0], "unknown key; known keys: objects, relation")
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects:
        raise SpecError("objects", "expected a non-empty list")
    objs = tuple(_object_from_dict(o, f"objects[{i}]") for i, o in enumerate(objects))
    relation = data.get("relation")
    if relation is not None:
        if relation not in RELATIONS:
            raise SpecError("relation", f"unknown relation {relation!r}; known: {list(RELATIONS)}")
        if len(objs) != 2 or any(o.count != 1 or o.position is not None for o in objs):
            raise SpecError("relation", "a relation needs exactly two objects of count 1 without grid positions")
    spec = PromptSpec(objs, relation)
    if spec.total_count > 9:
        raise SpecError("objects", f"at most 9 objects fit the 3 x 3 grid, the spec asks for {spec.total_count}")
    return spec


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(o: ObjectSpec) -> str:
    if o.count > 1:
        text = f"{COUNT_WORDS[o.count]} {o.colour} {PLURALS[o.shape]}"
    else:
        text = f"{_article(o.colour)} {o.colour} {o.shape}"
    return f"{text} {POSITION_PHRASES[o.position]}" if o.position else text


def prompt_for(spec: PromptSpec) -> str:
    """The grammar's caption of a spec ("a red circle to the left of a blue square")."""
    if spec.relation is not None:
        a, b = spec.objects
        return f"{_object_phrase(a)} {RELATIONS[spec.relation]} {_object_phrase(b)}"
    return " and ".join(_object_phrase(o) for o in spec.objects)


_WORD_COUNTS = {"a": 1, "an": 1, "one": 1, **{w: n for n, w in COUNT_WORDS.items() if n > 1}}
_SINGULAR = {v: k for k, v in PLURALS.items()}
_POSITION_BY_PHRASE = {v: k for k, v in POSITION_PHRASES.items()}
_OBJECT_RE = re.compile(r"^(?P<count>[a-z]+) (?P<colour>[a-z]+) (?P<shape>[a-z]+)(?: (?P<position>.+))?$")
_RELATION_RE = re.compile("^(?P<a>.+?) (?P<rel>" + "|".join(sorted(RELATIONS.values(), key=len, reverse=True)) +
                          ") (?P<b>.+)$")


def _parse_object(text: str, prompt: str) -> ObjectSpec:
    m = _OBJECT_RE.match(text)
    if not m:
        raise ValueError(f"prompt {prompt!r}: cannot read {text!r} as '<a|count> <colour> <shape>'")
    count = _WORD_COUNTS.get(m.group("count"))
    colour, shape = m.group("colour"), m.group("shape")
    shape = _SINGULAR.get(shape, shape)
    if count is None or colour not in PALETTE or shape not in SHAPE_NAMES:
        raise ValueError(f"prompt {prompt!r}: {text!r} names no known count, colour and shape")
    position = None
    if m.group("position"):
        position = _POSITION_BY_PHRASE.get(m.group("position"))
        if position is None:
            raise ValueError(f"prompt {prompt!r}: unknown position phrase {m.group('position')!r}")
    return ObjectSpec(colour, shape, count, position)


def parse_prompt(prompt: str) -> PromptSpec:
    """Read a grammar caption back into a :class:`PromptSpec` (inverse of :func:`prompt_for`).

    Raises ``ValueError`` naming the prompt when it is not a caption of the grammar.
    """
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    m = _RELATION_RE.match(text)
    if m:
        relation = {v: k for k, v in RELATIONS.items()}[m.group("rel")]
        return spec_from_dict(PromptSpec((_parse_object(m.group("a"), prompt), _parse_object(m.group("b"), prompt)),
                                         relation).to_dict())
    return spec_from_dict(PromptSpec(tuple(_parse_object(part, prompt) for part in text.split(" and "))).to_dict())


def scene_for_spec(spec: PromptSpec, seed: int) -> ShapeSpec:
    """A concrete scene that satisfies ``spec``, laid out as the training grammar lays out scenes
    of that kind (one large object alone; otherwise small objects in distinct grid cells; the two
    objects of a relation in one row or column).  Deterministic in ``seed``."""
    rng = np.random.default_rng([int(seed), 0x5CE7E])
    caption = prompt_for(spec)
    if spec.relation is not None:
        (a, b) = spec.objects
        cell_a, cell_b = relation_cells(spec.relation, rng)
        return ShapeSpec((cell_object(rng, a.colour, a.shape, cell_a), cell_object(rng, b.colour, b.shape, cell_b)),
                         caption)
    if len(spec.objects) == 1 and spec.objects[0].count == 1:
        o = spec.objects[0]
        if o.position is not None:
            return ShapeSpec((cell_object(rng, o.colour, o.shape, o.position),), caption)
        size = float(rng.uniform(0.45, 0.72))
        margin = (1 - size) / 2 * 0.7
        return ShapeSpec((ShapeObject(o.colour, o.shape, 0.5 + float(rng.uniform(-margin, margin)),
                                      0.5 + float(rng.uniform(-margin, margin)), size),), caption)
    taken = {o.position for o in spec.objects if o.position is not None}
    free = [c for c in POSITIONS if c not in taken]
    wanted = sum(o.count for o in spec.objects if o.position is None)
    chosen = iter([free[int(k)] for k in rng.choice(len(free), size=wanted, replace=False)])
    placed: List[ShapeObject] = []
    for o in spec.objects:
        for _ in range(o.count):
            placed.append(cell_object(rng, o.colour, o.shape, o.position or next(chosen)))
    return ShapeSpec(tuple(placed), caption)
