"""A YAML section starts from the defaults of the run type it belongs to — for every shipped config.

Found by a user: a fine-tuning config's `train:` section without `max_steps` got pre-training's 1000 steps
(TrainConfig's own default), which won over its `epochs`: configs/finetune/trec_minilm.yaml (epochs: 3) trained
1000 steps. Each key a shipped YAML leaves out of a section it writes must equal what the run type would give
with no section at all; and a grid point's config is checked the same way through its base."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from trainer import config as C
from trainer.loop import run_length

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = {"pretrain": C.PretrainConfig, "finetune": C.FinetuneConfig, "recipe": C.RecipeConfig,
           "grid": C.GridConfig}
SHIPPED = sorted(p for p in (REPO / "configs").glob("*/*.yaml"))


def _schema(path: Path):
    return SCHEMAS[path.parent.name]


def _left_out(given: dict, loaded, default, prefix: str = ""):
    """(key, loaded value, run-type default) for every key of a written section that the YAML leaves out."""
    for f in dataclasses.fields(loaded):
        value, dflt = getattr(loaded, f.name), getattr(default, f.name)
        if f.name not in given:
            yield prefix + f.name, value, dflt
        elif dataclasses.is_dataclass(value) and isinstance(given[f.name], dict):
            yield from _left_out(given[f.name], value, dflt, f"{prefix}{f.name}.")


def test_shipped_configs_are_all_seen():
    assert {p.parent.name for p in SHIPPED} == set(SCHEMAS) and len(SHIPPED) >= 15


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sections_start_from_their_run_type_defaults(path):
    schema = _schema(path)
    given = yaml.safe_load(path.read_text()) or {}
    loaded = C.load(schema, str(path), [])
    differ = [(k, v, d) for k, v, d in _left_out(given, loaded, schema()) if v != d]
    assert not differ, f"{path.name}: keys left out of a section differ from the run type's defaults: {differ}"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "grid").glob("*.yaml")), ids=lambda p: p.name)
def test_grid_points_start_from_their_stage_defaults(path):
    from trainer import grid
    cfg = C.load(C.GridConfig, str(path), [])
    base = grid.base_path(cfg)
    schema = grid.STAGES[cfg.stage]
    given = yaml.safe_load(base.read_text()) or {}
    loaded = C.load(schema, str(base), [f"{k}={grid._yaml_value(v)}" for k, v in cfg.overrides.items()])
    for key, value in cfg.overrides.items():  # a grid override sets one key, nothing else of its section
        node = given
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    differ = [(k, v, d) for k, v, d in _left_out(given, loaded, schema()) if v != d]
    assert not differ, f"{path.name}: {differ}"


def test_finetune_train_section_without_max_steps_runs_epochs(tmp_path):
    cfg_path = tmp_path / "ft.yaml"
    cfg_path.write_text("train:\n  epochs: 3\n  micro_batch_size: 16\n")
    cfg = C.load(C.FinetuneConfig, str(cfg_path), [])
    assert cfg.train.max_steps == -1 and cfg.train.epochs == 3 and cfg.train.save_every == 0
    trec = C.load(C.FinetuneConfig, str(REPO / "configs/finetune/trec_minilm.yaml"), [])
    imdb = C.load(C.FinetuneConfig, str(REPO / "configs/finetune/imdb_bert_base.yaml"), [])
    assert (trec.train.max_steps, trec.train.epochs) == (-1, 3)
    assert (imdb.train.max_steps, imdb.train.epochs) == (-1, 4)
    # a recipe's finetune.train starts from fine-tuning's defaults, its pretrain.train from pre-training's
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text("finetune:\n  train: {epochs: 2}\npretrain:\n  train: {micro_batch_size: 4}\n")
    recipe = C.load(C.RecipeConfig, str(recipe_path), [])
    assert recipe.finetune.train.max_steps == -1 and recipe.pretrain.train.max_steps == 1000


def test_run_length_says_which_setting_ends_the_run():
    ft = C.FinetuneConfig().train
    line = run_length(dataclasses.replace(ft, epochs=3), samples_per_epoch=1000, samples_per_step=32)
    assert "train.epochs=3 = 94 optimizer steps" in line
    line = run_length(dataclasses.replace(ft, max_steps=50, epochs=3), samples_per_epoch=1000, samples_per_step=32)
    assert "train.max_steps=50" in line and "train.epochs=3 does not apply" in line
