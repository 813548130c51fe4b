"""Recipe loader: inheritance, dot-list overrides, strict schema validation, kwargs checks."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Literal, Optional

import pytest
from omegaconf import OmegaConf

from infinity_lightning.recipes import (
    RecipeError,
    check_kwargs,
    list_recipes,
    load_recipe,
    resolve_recipe,
    save_recipe,
    trainer_kwargs,
    validate,
)

BASE = """
trainer:
  max_steps: 100
  precision: 32-true
model:
  preset: tiny
  lr: 0.001
  betas: [0.9, 0.97]
data:
  batch_size: 4
"""

CHILD = """
base: base.yaml
trainer:
  max_steps: 10
model:
  lr: 0.01
extra:
  name: ${model.preset}-run
"""


@dataclasses.dataclass
class ModelSection:
    preset: str = "tiny"
    lr: float = 1e-3
    betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.97])
    dropout: Optional[float] = None
    attn: Literal["sdpa", "flex"] = "sdpa"


SCHEMA = {
    "trainer": dict,
    "model": ModelSection,
    "data": {"batch_size": int, "workers": int},
    "extra": {"*": str},
}


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def recipes(tmp_path):
    _write(tmp_path, "base.yaml", BASE)
    return _write(tmp_path, "child.yaml", CHILD)


def test_inheritance_merges_under_the_file(recipes):
    cfg = load_recipe(recipes, schema=SCHEMA)
    assert cfg.trainer.max_steps == 10 and cfg.trainer.precision == "32-true"  # child wins, base kept
    assert cfg.model.lr == 0.01 and cfg.model.preset == "tiny" and list(cfg.model.betas) == [0.9, 0.97]
    assert cfg.extra.name == "tiny-run" and "base" not in cfg


def test_override_existing_and_added_keys(recipes):
    cfg = load_recipe(recipes, ["trainer.max_steps=7", "model.betas=[0.5,0.6]", "+trainer.log_every_n_steps=3",
                                "+extra.tag=abc"], schema=SCHEMA)
    assert cfg.trainer.max_steps == 7 and list(cfg.model.betas) == [0.5, 0.6]
    assert cfg.trainer.log_every_n_steps == 3 and cfg.extra.tag == "abc"


def test_unknown_override_key_rejected_with_suggestion(recipes):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipes, ["trainer.max_step=5"])
    msg = str(info.value)
    assert "'trainer.max_step'" in msg and "child.yaml" in msg and "trainer.max_steps" in msg and "+trainer.max_step" in msg
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(recipes, ["trainer.max_steps"])


def test_added_key_still_validated(recipes):
    with pytest.raises(RecipeError, match=r"^the command-line overrides: unknown key 'model.dropuot'. Did you mean: dropout"):
        load_recipe(recipes, ["+model.dropuot=0.1"], schema=SCHEMA)
    assert load_recipe(recipes, ["+model.dropout=0.1"], schema=SCHEMA).model.dropout == 0.1


def test_wrong_types_rejected(recipes):
    with pytest.raises(RecipeError, match=r"'model.lr' = 'fast' \(str\).*float"):
        load_recipe(recipes, ["model.lr=fast"], schema=SCHEMA)
    with pytest.raises(RecipeError, match=r"'data.batch_size' = 2.5 \(float\).*int"):
        load_recipe(recipes, ["data.batch_size=2.5"], schema=SCHEMA)
    with pytest.raises(RecipeError, match=r"'model.attn' = 'flash'"):
        load_recipe(recipes, ["+model.attn=flash"], schema=SCHEMA)
    with pytest.raises(RecipeError, match=r"'model.betas'"):
        load_recipe(recipes, ["model.betas=[0.9,high]"], schema=SCHEMA)
    with pytest.raises(RecipeError, match=r"'data.batch_size' = True"):
        load_recipe(recipes, ["data.batch_size=true"], schema=SCHEMA)
    # ints are fine where floats are expected
    assert load_recipe(recipes, ["model.lr=1"], schema=SCHEMA).model.lr == 1


def test_unknown_nested_key_in_yaml_names_the_file(tmp_path, recipes):
    _write(tmp_path, "base.yaml", BASE + "  num_workers: 2\n")  # under data:, a typo of 'workers'
    with pytest.raises(RecipeError) as info:
        load_recipe(recipes, schema=SCHEMA)
    msg = str(info.value)
    assert "unknown key 'data.num_workers'" in msg and msg.startswith(str(tmp_path / "base.yaml"))
    assert "workers" in msg
    bad_child = _write(tmp_path, "bad.yaml", "base: base.yaml\nmodel:\n  nested:\n    deep: 1\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: unknown key 'model.nested'"):
        load_recipe(bad_child, schema={**SCHEMA, "data": dict})


def test_missing_recipe_and_cycles(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    _write(tmp_path, "a.yaml", "base: b.yaml\nx: 1\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\ny: 2\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    _write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(RecipeError, match="mapping at the top level"):
        load_recipe(tmp_path / "list.yaml")


def test_builtin_recipe_names(tmp_path, monkeypatch):
    import infinity_lightning.recipes.loader as recipes_mod

    (tmp_path / "var").mkdir()
    _write(tmp_path / "var", "quickstart.yaml", BASE)
    monkeypatch.setattr(recipes_mod, "_recipes_root", lambda: tmp_path)
    assert list_recipes() == ["var/quickstart"]
    assert resolve_recipe("var/quickstart") == (tmp_path / "var" / "quickstart.yaml").resolve()
    child = _write(tmp_path, "mine.yaml", "base: var/quickstart\nmodel:\n  lr: 0.5\n")
    (tmp_path / "elsewhere").mkdir()
    moved = _write(tmp_path / "elsewhere", "mine.yaml", child.read_text())  # base resolved as a built-in
    cfg = load_recipe(moved, schema=SCHEMA)
    assert cfg.model.lr == 0.5 and cfg.trainer.max_steps == 100
    with pytest.raises(RecipeError, match="did you mean var/quickstart"):
        load_recipe("var/quickstrat")


def test_builtin_recipes_come_from_the_package():
    from importlib.resources import files

    root = Path(str(files("infinity_lightning.recipes_data")))
    assert (root / "__init__.py").exists()
    assert all((root / f"{name}.yaml").is_file() for name in list_recipes())


def test_trainer_kwargs_validation(recipes):
    cfg = load_recipe(recipes, ["+trainer.log_every_n_steps=5"])
    kwargs = trainer_kwargs(cfg.trainer)
    assert kwargs == {"max_steps": 10, "precision": "32-true", "log_every_n_steps": 5} and type(kwargs) is dict
    bad = load_recipe(recipes, ["+trainer.max_epoch=3"])
    with pytest.raises(RecipeError) as info:
        trainer_kwargs(bad.trainer)
    msg = str(info.value)
    assert "'trainer.max_epoch'" in msg and "max_epochs" in msg and "accumulate_grad_batches" in msg


def test_check_kwargs():
    def build(width: int, depth: int = 2, *, dropout: float = 0.0):
        return width

    class Flexible:
        def __init__(self, a, **rest):
            pass

    assert check_kwargs(build, OmegaConf.create({"width": 3, "dropout": 0.1}), "section model") == {"width": 3, "dropout": 0.1}
    with pytest.raises(RecipeError, match=r"section model: unknown key 'dept' \(did you mean depth\?\): .*build does "
                                          r"not take it. Valid names: width, depth, dropout"):
        check_kwargs(build, {"dept": 3}, "section model")
    assert check_kwargs(Flexible, {"anything": 1}, "x") == {"anything": 1}


def test_validate_dataclass_schema_directly():
    validate({"preset": "tiny", "lr": 0.1, "betas": [0.9, 0.95], "dropout": None}, ModelSection, "inline")
    with pytest.raises(RecipeError, match=r"inline: 'dropout' = 'x'.*Optional\[float\]|inline: 'dropout' = 'x'"):
        validate({"dropout": "x"}, ModelSection, "inline")
    with pytest.raises(RecipeError, match="unknown key 'x.y'"):
        validate({"x": {"y": 1}}, {"x": {"z": Dict[str, int]}}, "inline")


def test_save_recipe_round_trip(recipes, tmp_path):
    cfg = load_recipe(recipes, ["trainer.max_steps=3"])
    out = save_recipe(cfg, tmp_path / "run" / "recipe.yaml")
    text = out.read_text()
    assert "${" not in text  # interpolations resolved
    again = OmegaConf.load(out)
    assert again.extra.name == "tiny-run" and again.trainer.max_steps == 3 and "base" not in again


def test_mandatory_values_can_be_overridden_without_plus(tmp_path):
    from infinity_lightning.recipes import load_recipe
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  weights: ???\n  depth: 2\n")
    cfg = load_recipe(str(path), ["model.weights=/x.pth"])
    assert cfg.model.weights == "/x.pth"


# -- composing: deleting keys, replacing sections, switching components ---------------------------
COMPONENTS_BASE = """
data:
  name: jsonl
  data_dir: ???
  batch_size: 2
  short_caption_prob: 0.5
  seed: 3
trainer:
  max_steps: 10
"""

#: what each DataModule takes in these tests (the recipe builder passes the real registry)
TAKES = {"jsonl": {"data_dir", "batch_size", "short_caption_prob", "seed"},
         "folder": {"data_dir", "batch_size", "captions_file", "seed"}}


def _takes(section, name):
    return TAKES.get(name) if section == "data" else None


def test_deleting_a_key_and_replacing_a_section(tmp_path):
    path = _write(tmp_path, "c.yaml", COMPONENTS_BASE)
    cfg = load_recipe(path, ["~data.seed", "~trainer.max_steps"])
    assert "seed" not in cfg.data and "max_steps" not in cfg.trainer and cfg.data.batch_size == 2
    with pytest.raises(RecipeError, match=r"override '~data.sed': key 'data.sed' is not in .*c.yaml. Did you mean: data.seed"):
        load_recipe(path, ["~data.sed"])
    with pytest.raises(RecipeError, match="'~key' deletes a key and takes no value"):
        load_recipe(path, ["~data.seed=1"])
    # a mapping value replaces the whole key; a file's nested mapping (and a dotted key) merges
    cfg = load_recipe(path, ["data={name: folder, data_dir: imgs}"])
    assert OmegaConf.to_container(cfg.data) == {"name": "folder", "data_dir": "imgs"}
    cfg = load_recipe(path, ["data.batch_size=8"])
    assert cfg.data.short_caption_prob == 0.5 and cfg.data.batch_size == 8
    with pytest.raises(RecipeError, match=r"must look like key=value .*must be quoted in the shell"):
        load_recipe(path, ["data={name:", "folder}"])


def test_a_new_component_starts_its_section_over(tmp_path, caplog):
    path = _write(tmp_path, "c.yaml", COMPONENTS_BASE)
    with caplog.at_level("INFO", logger="infinity_lightning.recipes.loader"):
        cfg = load_recipe(path, ["data.name=folder", "data.data_dir=imgs", "data.captions_file=caps.jsonl"],
                          components=_takes)
    # the jsonl-only key is gone, the keys both take stay, the folder's own key needs no '+'
    assert OmegaConf.to_container(cfg.data) == {"name": "folder", "data_dir": "imgs", "batch_size": 2, "seed": 3,
                                                "captions_file": "caps.jsonl"}
    assert "data.short_caption_prob is dropped" in caplog.text and "'folder' replaces 'jsonl'" in caplog.text
    # keys set by earlier overrides stay even if the new component does not take them (validation names them)
    cfg = load_recipe(path, ["data.short_caption_prob=0.2", "data.name=folder"], components=_takes)
    assert cfg.data.short_caption_prob == 0.2
    # without a registry every other key goes; an unknown name keeps the section for validation to name it
    cfg = load_recipe(path, ["data.name=folder"])
    assert OmegaConf.to_container(cfg.data) == {"name": "folder"}
    cfg = load_recipe(path, ["data.name=pictures"], components=_takes)
    assert cfg.data.short_caption_prob == 0.5
    # the same name changes nothing
    assert load_recipe(path, ["data.name=jsonl"], components=_takes).data.short_caption_prob == 0.5
    # a key the current component does not take still needs '+'
    with pytest.raises(RecipeError, match="key 'data.captions_file' is not in"):
        load_recipe(path, ["data.captions_file=x"], components=_takes)


def test_a_file_that_switches_its_bases_component(tmp_path):
    _write(tmp_path, "base.yaml", COMPONENTS_BASE)
    child = _write(tmp_path, "child.yaml", "base: base.yaml\ndata:\n  name: folder\n  data_dir: photos\n")
    cfg = load_recipe(child, components=_takes)
    assert OmegaConf.to_container(cfg.data) == {"name": "folder", "data_dir": "photos", "batch_size": 2, "seed": 3}
    same = _write(tmp_path, "same.yaml", "base: base.yaml\ndata:\n  batch_size: 4\n")
    assert load_recipe(same, components=_takes).data.short_caption_prob == 0.5  # no switch, plain merge


def test_the_recipe_builder_knows_the_data_modules():
    from infinity_lightning.recipes import load_run_recipe

    cfg, _, _ = load_run_recipe("var/finetune_2b", ["model.weights=w", "model.tokenizer=t", "model.text_encoder=e",
                                                    "data.name=folder", "data.data_dir=imgs", "data.captions_file=c"])
    assert OmegaConf.to_container(cfg.data, resolve=True) == {"name": "folder", "data_dir": "imgs", "batch_size": 2,
                                                              "num_workers": 4, "seed": 0, "captions_file": "c"}
