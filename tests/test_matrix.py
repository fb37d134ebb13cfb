"""The setup matrix: every stage under every shipped setup that runs on CPU, in fp32 and bf16, for every family.

Two kinds of cell, each launched as users launch (`accelerate launch --config_file launch/accelerate/<setup>.yaml`,
or one plain process for `single`):
- recipe cells (BERT), every setup × precision: the recipe — every stage: the FiT baselines, further pre-training →
  ITPT-FiT (three tasks, three long-text strategies) → MFiT → MFiT-FiT — in one process, then predict from an
  export;
- family cells, every family × setup, the precision alternating so that every (family, precision) pair occurs too:
  pre-training, fine-tuning from its export, predict;
- task-kind cells, multi-label and regression × DDP and ZeRO-3: fine-tuning, the export (HF class with its
  problem_type), predict.
Both stop a pre-training run half-way, resume it and compare it with the uninterrupted run.

Every cell asserts what a user cares about: each stage ran under the engine, ZeRO stage, offload and precision it
was launched with (read back into `metrics.jsonl`: from the DeepSpeed engine, or for single / DDP from the dtype of
the first training forward), the loss fell, every export reloads
with `from_pretrained` as fp32, the next stage and predict run from it, and stop + resume matches.

CI runs the cells in `CI_CELLS`; `python bench/matrix.py` runs them all and writes `bench/RESULTS_matrix.md`
(BERT_RECIPE_MATRIX=all selects every cell)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launching import metrics, run

SETUPS = ("single", "cpu_ddp", "cpu_zero2", "cpu_zero3", "cpu_zero3_offload")
PRECISIONS = ("fp32", "bf16")
EXPECTED = {  # setup → (engine, ZeRO stage, offload) as read back from the prepared objects
    "single": ("single", 0, "none"),
    "cpu_ddp": ("ddp", 0, "none"),
    "cpu_zero2": ("deepspeed", 2, "none"),
    "cpu_zero3": ("deepspeed", 3, "none"),
    "cpu_zero3_offload": ("deepspeed", 3, "optimizer=cpu,param=cpu"),
}
_SIZE = "hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128"
FAMILIES = {
    "bert": f"{{model_type: bert, {_SIZE}, max_position_embeddings: 128}}",
    "roberta": f"{{model_type: roberta, {_SIZE}, max_position_embeddings: 130}}",
    "electra": f"{{model_type: electra, embedding_size: 32, {_SIZE}, max_position_embeddings: 128}}",
    "deberta-v2": f"{{model_type: deberta-v2, {_SIZE}, max_position_embeddings: 128, relative_attention: true, "
                  f"position_buckets: 16, norm_rel_ebd: layer_norm, pos_att_type: [p2c, c2p]}}",
    "albert": f"{{model_type: albert, embedding_size: 32, {_SIZE}, max_position_embeddings: 128}}",
    "distilbert": "{model_type: distilbert, dim: 64, n_layers: 2, n_heads: 2, hidden_dim: 128, "
                  "max_position_embeddings: 128}",
}
NO_DROPOUT = {"distilbert": ("model.config.dropout=0", "model.config.attention_dropout=0")}
KINDS = ("multi_label", "regression")
KIND_SETUPS = ("cpu_ddp", "cpu_zero3")
RECIPE_CELLS = [(s, p) for s in SETUPS for p in PRECISIONS]
KIND_CELLS = [(k, s, PRECISIONS[(i + j) % 2]) for i, k in enumerate(KINDS) for j, s in enumerate(KIND_SETUPS)]
FAMILY_CELLS = [(f, s, PRECISIONS[(i + j) % 2]) for i, f in enumerate(FAMILIES) for j, s in enumerate(SETUPS)]
# the suite's stop/resume coverage of ZeRO-3, DDP and offload rests on these three: keep those setups in them
CI_CELLS = {("cpu_zero3", "bf16"), ("deberta-v2", "cpu_ddp", "bf16"), ("albert", "cpu_zero3_offload", "fp32")}
ALL = os.environ.get("BERT_RECIPE_MATRIX") == "all"


def cells(cases):
    return [pytest.param(*c, id="-".join(c), marks=() if ALL or c in CI_CELLS else
                         pytest.mark.skip(reason="full matrix only: BERT_RECIPE_MATRIX=all / bench/matrix.py"))
            for c in cases]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def launch(setup, out, *overrides, **kw):
    return run(None if setup == "single" else setup, out, *overrides, timeout=1200, **kw)


def assert_ran_as_launched(out: Path, setup: str, precision: str) -> list[dict]:
    engine, zero, offload = EXPECTED[setup]
    train = [r for r in metrics(out) if "loss" in r and "split" not in r]
    assert train, out
    for r in train:
        assert (r["engine"], r["zero_stage"], r["offload"], r["precision"]) == (engine, zero, offload, precision), \
            (out, r)
    return train


def assert_fp32_export(model_dir: Path, auto_class: str) -> None:
    import transformers
    model = getattr(transformers, auto_class).from_pretrained(str(model_dir))
    assert {p.dtype for p in model.parameters()} == {torch.float32}, model_dir


def predict_runs(model_dir: Path, tmp: Path) -> None:
    from trainer.predict import predict_file
    texts = ["the chef simmered the sauce", "the striker scored a late goal", "the bank raised rates"]
    src = tmp / "predict_in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert predict_file(str(model_dir), str(src), str(tmp / "predict_out.jsonl"))["predicted"] == len(texts)
    labels = json.loads((model_dir / "bert_recipe.json").read_text())["labels"]
    rows = [json.loads(ln) for ln in (tmp / "predict_out.jsonl").read_text().splitlines()]
    assert all(r["label"] in labels and abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


def pretrain_stop_resume_matches(setup, precision, arch_overrides, tmp: Path, cache) -> Path:
    """Pre-train 8 steps, and again stopped at step 4 and resumed: the same losses and lrs at every step, the same
    final weights. (The suite's stop/resume check for ZeRO-3, DDP and offload: CI_CELLS cover those setups;
    tests/test_resume_world_size.py checks ZeRO-2 and the wandb run across the interruption.)"""
    common = [*arch_overrides, f"model.precision={precision}", "train.max_steps=8", "train.log_every=1",
              "train.save_every=4", "optim.warmup_ratio=0"]
    ref, moved = tmp / "pt_ref", tmp / "pt_moved"
    launch(setup, ref, *common, cache=cache)
    launch(setup, moved, *common, "train.stop_at_step=4", cache=cache)
    launch(setup, moved, *common, cache=cache, flags=["--resume"])
    a, b = assert_ran_as_launched(ref, setup, precision), assert_ran_as_launched(moved, setup, precision)
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9), x["step"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
    assert a[-1]["loss"] < a[0]["loss"]
    assert_fp32_export(ref / "hf_model", "AutoModelForMaskedLM")
    wa, wb = (load_file(str(run / "hf_model" / "model.safetensors")) for run in (ref, moved))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    return ref / "hf_model"


@pytest.mark.parametrize("setup,precision", cells(RECIPE_CELLS))
def test_recipe_cell(tmp_path, cache, setup, precision):
    out = tmp_path / "recipe"
    launch(setup, out, f"model.precision={precision}", "pretrain.train.max_steps=30",
           "pretrain.train.save_every=15", "pretrain.train.log_every=5", "finetune.train.max_steps=12",
           "finetune.train.eval_every=6", cache=cache, script="recipe.py", config="configs/recipe/tiny.yaml")
    stage_dirs = [*(out / "fit").iterdir(), out / "pretrain", *(out / "pt_fit").iterdir(), out / "mfit",
                  *(out / "mfit_fit").iterdir()]
    assert len(stage_dirs) == 11
    for stage in stage_dirs:  # every stage under the setup it was launched with (not only the first)
        assert_ran_as_launched(stage, setup, precision)
    pt = [r for r in metrics(out / "pretrain") if "loss" in r]
    assert pt[-1]["loss"] < pt[0]["loss"]
    assert_fp32_export(out / "pretrain" / "hf_model", "AutoModelForMaskedLM")
    assert_fp32_export(out / "mfit_fit" / "topics" / "hf_model", "AutoModelForSequenceClassification")
    predict_runs(out / "mfit_fit" / "topics" / "hf_model", tmp_path)
    assert json.loads((out / "results.json").read_text())
    pretrain_stop_resume_matches(setup, precision, ("model.config.hidden_dropout_prob=0",
                                                    "model.config.attention_probs_dropout_prob=0"), tmp_path, cache)


@pytest.mark.parametrize("family,setup,precision", cells(FAMILY_CELLS))
def test_family_cell(tmp_path, cache, family, setup, precision):
    no_dropout = NO_DROPOUT.get(family, ("model.config.hidden_dropout_prob=0",
                                         "model.config.attention_probs_dropout_prob=0"))
    export = pretrain_stop_resume_matches(setup, precision, (f"model.config={FAMILIES[family]}", *no_dropout),
                                          tmp_path, cache)
    ft = tmp_path / "ft"
    launch(setup, ft, f"model.name_or_path={export}", "model.tokenizer=null", "model.config=null",
           f"model.precision={precision}", "optim.layer_decay=0.9", "optim.lr=3e-3", "train.max_steps=40",
           "train.log_every=5", "train.eval_every=20",
           cache=cache, script="finetune.py", config="configs/finetune/tiny.yaml")
    train = assert_ran_as_launched(ft, setup, precision)
    assert train[-1]["loss"] < train[0]["loss"]
    assert_fp32_export(ft / "hf_model", "AutoModelForSequenceClassification")
    predict_runs(ft / "hf_model", tmp_path)


@pytest.mark.parametrize("kind,setup,precision", cells(KIND_CELLS))
def test_kind_cell(tmp_path, cache, kind, setup, precision):
    from problem_data import multi_label_rows, regression_rows
    from tiny_data import write_jsonl
    make, field = {"multi_label": (multi_label_rows, "labels"), "regression": (regression_rows, "score")}[kind]
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", make(n, seed))
             for split, n, seed in (("train", 96, 1), ("dev", 24, 2), ("test", 24, 3))}
    ft = tmp_path / "ft"
    launch(setup, ft, *(f"data.{k}={v}" for k, v in files.items()), f"data.label_field={field}",
           f"data.problem_type={kind}", f"model.precision={precision}", "optim.layer_decay=0.9", "optim.lr=3e-3",
           "train.max_steps=40", "train.log_every=5", "train.eval_every=20",
           cache=cache, script="finetune.py", config="configs/finetune/tiny.yaml")
    train = assert_ran_as_launched(ft, setup, precision)
    assert train[-1]["loss"] < train[0]["loss"]
    assert_fp32_export(ft / "hf_model", "AutoModelForSequenceClassification")
    conf = json.loads((ft / "hf_model" / "config.json").read_text())
    assert conf["problem_type"] == {"multi_label": "multi_label_classification", "regression": "regression"}[kind]
    from trainer.predict import predict_file
    assert predict_file(str(ft / "hf_model"), str(files["test"]), str(tmp_path / "p.jsonl"))["predicted"] == 24
    rows = [json.loads(ln) for ln in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(isinstance(r["labels"], list) if kind == "multi_label" else isinstance(r["value"], float) for r in rows)
