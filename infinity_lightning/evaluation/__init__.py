"""Strict, GenEval-style evaluation of text-to-image models on the procedural shapes world.

* :mod:`.specs`: what a prompt asks for (:class:`PromptSpec`), caption <-> spec.
* :mod:`.checker`: :class:`StrictShapesChecker`, every object found and named only on clear
  evidence, verdicts per category with a reason.
* :mod:`.protocol`: versioned, frozen protocol files (:func:`load_protocol`; the shipped
  ``protocols/shapes_v1.json`` is :func:`build_shapes_protocol`'s output).
* :mod:`.runner`: :func:`evaluate` any ``generate_fn(prompts, seeds)`` against a protocol.
* :mod:`.report`: accuracy per category with Wilson intervals, JSON, markdown, image grid.
* :mod:`.calibration`: the positives and adversarial images the checker's thresholds are set on.

Layering: this package builds on the foundations (:mod:`infinity_lightning.io`) and the shapes
world (:mod:`infinity_lightning.datamodules.shapes`) only; a model reaches it through a
``generate_fn`` (``infinity-lightning evaluate`` wraps a pipeline folder into one).
"""
from .checker import (
    CATEGORIES,
    GROUPS,
    HELD_OUT_GROUP,
    Analysis,
    Detection,
    StrictShapesChecker,
    Thresholds,
    Verdict,
    relations_between,
)
from .protocol import (
    EVALUATION_SEED_RANGE,
    TUNING_SEED_RANGE,
    Protocol,
    ProtocolError,
    ProtocolItem,
    build_shapes_protocol,
    default_protocol_path,
    load_protocol,
    protocol_from_dict,
    protocol_to_json,
)
from .report import build_report, report_markdown, save_grid, wilson_interval, write_report
from .runner import evaluate, select_subset
from .specs import ObjectSpec, PromptSpec, parse_prompt, prompt_for, scene_for_spec, spec_from_dict

__all__ = [
    "CATEGORIES", "GROUPS", "HELD_OUT_GROUP", "Analysis", "Detection", "StrictShapesChecker", "Thresholds",
    "Verdict", "relations_between", "EVALUATION_SEED_RANGE", "TUNING_SEED_RANGE", "Protocol", "ProtocolError",
    "ProtocolItem", "build_shapes_protocol", "default_protocol_path", "load_protocol", "protocol_from_dict",
    "protocol_to_json", "build_report", "report_markdown", "save_grid", "wilson_interval", "write_report",
    "evaluate", "select_subset", "ObjectSpec", "PromptSpec", "parse_prompt", "prompt_for", "scene_for_spec",
    "spec_from_dict",
]
