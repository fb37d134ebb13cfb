"""The model card and lineage in every export: a tiny recipe's final models name every stage that made them,
the card's metadata round-trips through huggingface_hub, and its usage line is the one that works."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launching import metrics, run

RECIPE = dict(script="recipe.py", config="configs/recipe/tiny.yaml")
SMALL = ["stages.fit_baseline=false", "pretrain.train.max_steps=20", "finetune.train.max_steps=8",
         "finetune.train.eval_every=4", "card.language=[en]", "card.license=apache-2.0", "card.tags=[demo]",
         "card.model_name=demo"]
TASKS = ("topics", "polarity", "length")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "r"
    run(None, out, *SMALL, cache=tmp_path_factory.mktemp("cache"), timeout=900, **RECIPE)
    return out


def _lineage(model_dir: Path) -> dict:
    return json.loads((model_dir / "lineage.json").read_text())


def _steps(run_dir: Path) -> int:
    return max(r["step"] for r in metrics(run_dir) if "lr" in r)


def test_final_models_carry_every_stage_of_the_recipe(recipe):
    for task in TASKS:
        model = recipe / "mfit_fit" / task / "hf_model"
        lineage = _lineage(model)
        stages = lineage["stages"]
        assert [s["stage"] for s in stages] == ["ITPT", "MFiT", "FiT"] and lineage["task"] is None
        runs = [recipe / "pretrain", recipe / "mfit", recipe / "mfit_fit" / task]
        assert [Path(s["output_dir"]) for s in stages] == runs
        assert [s["steps"] for s in stages] == [_steps(r) for r in runs] == [20, 8, 8]
        assert stages[0]["corpora"][0]["path"] == "builtin:grammar" and stages[0]["seq_len"] == 64
        assert [t["name"] for t in stages[1]["tasks"]] == list(TASKS)
        assert stages[2]["lr"] == pytest.approx(stages[1]["lr"] / 2)  # lr_scale_after_multitask
        assert stages[2]["layer_decay"] == 0.9 and stages[2]["start"] == str(recipe / "mfit" / "tasks" / task /
                                                                              "hf_model")
        results = json.loads((recipe / "mfit_fit" / task / "eval_results.json").read_text())
        assert stages[2]["results"]["default"]["test"]["error_rate"] == results["test"]["error_rate"]
        card = (model / "README.md").read_text()
        assert "made from a randomly initialised encoder by ITPT → MFiT → FiT" in card
        for s in stages:
            assert f"run dir `{s['output_dir']}`" in card
        assert "ITPT: pre-training (masked LM, within-task)" in card and "MFiT: multi-task fine-tuning" in card
        text = stages[2]["tasks"][0]["text"]
        assert f"{text['strategy']} truncation, max_len {text['max_len']}" in card
        assert "single process, fp32, 1 × CPU" in card
        assert "dev carved from train (10%, stratified)" in card  # the tiny tasks name no dev split
    mfit = _lineage(recipe / "mfit" / "tasks" / "polarity" / "hf_model")
    assert [s["stage"] for s in mfit["stages"]] == ["ITPT", "MFiT"] and mfit["task"] == "polarity"
    # card.model_name in a recipe: each export gets its own name (one name would make uploads overwrite)
    from huggingface_hub import ModelCard
    names = {d: ModelCard.load(recipe / d / "README.md").data.model_name
             for d in ("pretrain/hf_model", "mfit/tasks/polarity/hf_model", "mfit_fit/length/hf_model")}
    assert names == {"pretrain/hf_model": "demo-pretrain", "mfit/tasks/polarity/hf_model": "demo-mfit-polarity",
                     "mfit_fit/length/hf_model": "demo-mfit_fit-length"}


def test_card_metadata_round_trips_through_huggingface_hub(recipe):
    from huggingface_hub import ModelCard
    model = recipe / "mfit_fit" / "length" / "hf_model"
    card = ModelCard.load(model / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["language"] == ["en"]
    assert data["pipeline_tag"] == "text-classification" and data["library_name"] == "transformers"
    assert {"bert-recipe-trainer", "bert", "single-label", "demo"} <= set(data["tags"])
    assert "base_model" not in data and "datasets" not in data  # random init, builtin data: nothing on a hub
    results = json.loads((model.parent / "eval_results.json").read_text())
    found = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found[("test", "error_rate")] == pytest.approx(results["test"]["error_rate"], abs=1e-6)
    assert found[("dev", "accuracy")] == pytest.approx(results["dev"]["accuracy"], abs=1e-6)
    again = ModelCard(str(card))  # what was written parses back to the same metadata
    assert again.data.to_dict() == data
    pretrained = ModelCard.load(recipe / "pretrain" / "hf_model" / "README.md").data.to_dict()
    assert pretrained["pipeline_tag"] == "fill-mask" and "masked-lm" in pretrained["tags"]


def test_card_usage_is_the_pipeline_call_where_it_reproduces_training_else_predict(recipe, tmp_path):
    from transformers import pipeline
    from trainer.predict import predict_file
    length, polarity = (recipe / "mfit_fit" / t / "hf_model" for t in ("length", "polarity"))
    card = (length / "README.md").read_text()
    assert 'pipeline("text-classification", model="<user>/demo-mfit_fit-length", truncation=True)' in card
    assert f"--model {length} " in card and f"hf upload <user>/demo-mfit_fit-length {length}" in card
    other = (polarity / "README.md").read_text()
    assert "pipeline(" not in other and "head_tail" in other and f"launch/predict.py --model {polarity}" in other
    # the card's pipeline call gives predict's label and probability — also for a text longer than max_len 128,
    # which both cut the same way
    texts = ["One sentence. Two sentences. Three.", " ".join(["A sentence here."] * 60)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    predict_file(str(length), str(inp), str(tmp_path / "out.jsonl"), progress=False)
    expected = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    classifier = pipeline("text-classification", model=str(length), truncation=True)
    for got, want in zip(classifier(texts), expected):
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["probabilities"][want["label"]], abs=1e-5)
    assert classifier.tokenizer(texts[1], truncation=True)["input_ids"].__len__() == 128


def test_onnx_export_adds_its_usage_to_the_card(recipe):
    from huggingface_hub import ModelCard
    from trainer.onnx_export import export
    model = recipe / "mfit_fit" / "topics" / "hf_model"  # hierarchical: predict runs it, ONNX too
    export(str(model), quantize=True)
    card = ModelCard.load(model / "README.md")
    assert "onnx" in card.data.tags and "--backend onnx" in card.text and "--backend onnx-int8" in card.text
