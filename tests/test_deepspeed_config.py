"""The DeepSpeed JSON: loaded with our refusals, its "auto" values filled from the run config."""
from __future__ import annotations

import copy
import json

import pytest

from conftest import repo_root
from trainer.distributed import fill_deepspeed_config, load_deepspeed_config
from trainer.errors import UserError

AUTO = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
}


def _fill(ds, **kw):
    args = dict(micro_batch=8, grad_accum=4, max_grad_norm=1.0, precision="fp32", world_size=2)
    args.update(kw)
    return fill_deepspeed_config(ds, **args)


def test_fills_auto_values():
    out = _fill(AUTO, micro_batch=8, grad_accum=4, world_size=3, max_grad_norm=0.5, precision="bf16")
    assert out["train_micro_batch_size_per_gpu"] == 8
    assert out["gradient_accumulation_steps"] == 4
    assert out["train_batch_size"] == 8 * 4 * 3
    assert out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    assert out["fp16"]["loss_scale"] == 0  # other keys kept
    assert out["zero_optimization"] == {"stage": 2, "reduce_bucket_size": "auto"}  # left for accelerate
    assert AUTO["train_batch_size"] == "auto" and AUTO["bf16"] == {"enabled": "auto"}  # input not mutated


@pytest.mark.parametrize("precision,bf16,fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)])
def test_precision_sections(precision, bf16, fp16):
    out = _fill(AUTO, precision=precision)
    assert out["bf16"]["enabled"] is bf16 and out["fp16"]["enabled"] is fp16


def test_fills_missing_keys():
    out = _fill({}, micro_batch=2, grad_accum=1, world_size=4, max_grad_norm=0.0)
    assert out["train_micro_batch_size_per_gpu"] == 2
    assert out["gradient_accumulation_steps"] == 1
    assert out["train_batch_size"] == 8
    assert out["gradient_clipping"] == 0.0
    assert out["bf16"] == {"enabled": False} and out["fp16"] == {"enabled": False}
    assert out["zero_optimization"]["stage"] == 0


def test_consistent_explicit_values_accepted():
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4, "train_batch_size": 64,
          "gradient_clipping": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    out = _fill(ds, precision="bf16")
    assert out["train_batch_size"] == 64 and out["bf16"]["enabled"] is True
    assert out["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("key,value", [
    ("train_micro_batch_size_per_gpu", 16),
    ("gradient_accumulation_steps", 1),
    ("train_batch_size", 32),
    ("gradient_clipping", 0.5),
])
def test_conflicting_explicit_value_refused(key, value):
    ds = dict(AUTO, **{key: value})
    with pytest.raises(UserError, match=key):
        _fill(ds)


@pytest.mark.parametrize("section,precision", [("bf16", "fp32"), ("fp16", "bf16"), ("bf16", "fp16")])
def test_conflicting_precision_refused(section, precision):
    ds = copy.deepcopy(AUTO)
    ds[section] = {"enabled": True}
    with pytest.raises(UserError, match=section):
        _fill(ds, precision=precision)


def test_disabled_precision_section_conflicts_with_wanted_precision():
    ds = copy.deepcopy(AUTO)
    ds["bf16"] = {"enabled": False}
    with pytest.raises(UserError, match="bf16"):
        _fill(ds, precision="bf16")


# ----------------------------------------------------------------------------- loading
def _write(tmp_path, obj_or_text, name="ds.json"):
    p = tmp_path / name
    p.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text))
    return str(p)


def test_load_ok(tmp_path):
    assert load_deepspeed_config(_write(tmp_path, AUTO)) == AUTO


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_load_refuses_optimizer_and_scheduler(tmp_path, section):
    ds = dict(AUTO, **{section: {"type": "AdamW", "params": {}}})
    with pytest.raises(UserError, match=f"'{section}'"):
        load_deepspeed_config(_write(tmp_path, ds))


def test_load_bad_json(tmp_path):
    path = _write(tmp_path, '{"train_batch_size": "auto",\n  "zero_optimization": {"stage": 2,}\n}')
    with pytest.raises(UserError, match="not valid JSON") as exc:
        load_deepspeed_config(path)
    assert path in str(exc.value) and "line 2" in str(exc.value)


def test_load_not_an_object(tmp_path):
    with pytest.raises(UserError, match="JSON object"):
        load_deepspeed_config(_write(tmp_path, "[1, 2]"))


def test_load_missing(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_deepspeed_config(str(tmp_path / "nope.json"))


DS_FILES = sorted((repo_root() / "ds_configs").glob("*.json"))


def test_ds_configs_present():
    assert len(DS_FILES) >= 4


@pytest.mark.parametrize("path", DS_FILES, ids=[p.name for p in DS_FILES])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_repo_ds_configs_load_and_fill(path, precision):
    ds = load_deepspeed_config(str(path))
    out = fill_deepspeed_config(ds, micro_batch=4, grad_accum=2, max_grad_norm=1.0, precision=precision, world_size=2)
    assert out["train_batch_size"] == 16
    assert out["train_micro_batch_size_per_gpu"] == 4 and out["gradient_accumulation_steps"] == 2
    assert out["gradient_clipping"] == 1.0
    assert out["bf16"]["enabled"] is (precision == "bf16") and out["fp16"]["enabled"] is (precision == "fp16")
    assert isinstance(out["zero_optimization"]["stage"], int)
    # no top-level "auto" is left (zero_optimization sizes are filled by accelerate from the model)
    left = [k for k, v in out.items() if v == "auto"]
    assert left == []
    json.dumps(out)
