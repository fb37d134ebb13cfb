"""Multi-label and regression tasks, class weights, the selection metric and early stopping: the targets read from
every format, the metrics against hand-computed values, the bad inputs, and real runs through fine-tuning, the
export (HF pipeline) and predict."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from launching import error_lines, metrics, run
from problem_data import multi_label_rows, regression_rows
from test_finetune_cli import predict
from tiny_data import LABELS, write_jsonl
from trainer import problems
from trainer.config import ClassificationDataConfig
from trainer.errors import UserError
from trainer.text.tasks import load_task as _load_task


@pytest.fixture
def load(tiny_tokenizer, tmp_path):
    def load_task(**kw):
        return _load_task(ClassificationDataConfig(**kw), 0, tiny_tokenizer, tmp_path / "cache")
    return load_task


# ----------------------------------------------------------------------------- targets from every format
def test_multi_label_from_jsonl_lists_csv_cells_and_hub_sequence(load, tmp_path):
    rows = [{"text": "ball goal", "tags": ["sport"]}, {"text": "bread code", "tags": ["food", "tech"]},
            {"text": "the a", "tags": []}, {"text": "soup match", "tags": ["sport", "food"]}]
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "tags"])
        w.writeheader()
        w.writerows({"text": r["text"], "tags": "|".join(r["tags"])} for r in rows)
    import datasets
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    names = ["food", "sport", "tech"]
    datasets.Dataset.from_list([{"text": r["text"], "tags": [names.index(t) for t in r["tags"]]} for r in rows],
                               features=datasets.Features({"text": datasets.Value("string"),
                                                           "tags": datasets.List(datasets.ClassLabel(names=names))})
                               ).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    want = np.array([[0, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=np.float32)
    same = {"hub_splits": {"train": "train", "dev": "train"}}
    for spec, extra in ((jsonl, {}), (tmp_path / "t.csv", {"label_separator": "|"}), (hub, same)):
        splits, vocab = load(train=str(spec), dev=str(spec), label_field="tags", problem_type="multi_label", **extra)
        assert vocab == names, spec
        assert np.array_equal(splits["dev"].labels, want), spec


def test_regression_targets_from_numbers_and_csv_text(load, tmp_path):
    rows = [{"text": "a b", "y": 1}, {"text": "c", "y": 2.5}, {"text": "d e", "y": -0.75}]
    jsonl = write_jsonl(tmp_path / "r.jsonl", rows)
    (tmp_path / "r.csv").write_text("text,y\na b,1\nc,2.5\nd e,-0.75\n")
    for spec in (jsonl, tmp_path / "r.csv"):
        splits, vocab = load(train=str(spec), dev=str(spec), label_field="y", problem_type="regression")
        assert vocab == ["y"] and splits["dev"].labels.tolist() == [1.0, 2.5, -0.75]


@pytest.mark.parametrize("case", ["list in single_label", "regression text", "regression NaN", "regression inf",
                                  "multi-label test label unseen", "separator splits nothing",
                                  "class_weights of the wrong length"])
def test_bad_targets_name_file_and_row(load, tmp_path, case):
    ok = [{"text": "ball goal", "label": ["sport"]}, {"text": "bread", "label": ["food"]}]
    num = [{"text": "a", "label": 1.0}, {"text": "b", "label": 2.0}]
    spec = {"list in single_label": (ok, {}, "row 1: label ['sport'] is a list — texts with several labels are "
                                              "data.problem_type=multi_label"),
            "regression text": (None, {"problem_type": "regression"},
                                "row 3: regression target 'high' is not a finite number"),
            "regression NaN": (num + [{"text": "c", "label": math.nan}], {"problem_type": "regression"},
                               "row 3: regression target nan is not a finite number"),
            "regression inf": (num + [{"text": "c", "label": math.inf}], {"problem_type": "regression"},
                               "row 3: regression target inf is not a finite number"),
            "multi-label test label unseen": (ok, {"problem_type": "multi_label", "test": "unseen"},
                                              "row 2: label 'music' is not among the training labels"),
            "separator splits nothing": (None, {"problem_type": "multi_label", "label_separator": ";"},
                                         "data.label_separator ';' splits no label"),
            "class_weights of the wrong length": (None, {"class_weights": [1.0]}, None)}[case]
    rows, extra, match = spec
    if case == "regression text":  # (in jsonl, a text among numbers is the store's "mixed label types")
        (tmp_path / "t.csv").write_text("text,label\na,1\nb,2.5\nc,high\n")
        path = tmp_path / "t.csv"
    elif case == "separator splits nothing":
        (tmp_path / "t.csv").write_text("text,label\nball goal,sport|food\nbread,food\n")
        path = tmp_path / "t.csv"
    elif case == "class_weights of the wrong length":
        from trainer.problems import loss_weights
        with pytest.raises(UserError, match=r"data.class_weights must be 'balanced' or a list of 2 positive"):
            loss_weights("single_label", [1.0], np.array([0, 1]), ["a", "b"], "data.class_weights")
        return
    else:
        path = write_jsonl(tmp_path / "t.jsonl", rows)
    if extra.get("test") == "unseen":
        extra["test"] = str(write_jsonl(tmp_path / "test.jsonl", [ok[0], {"text": "x", "label": ["music"]}]))
    with pytest.raises(UserError) as err:
        load(train=str(path), dev=str(path), **extra)
    assert match in str(err.value) and str(tmp_path) in str(err.value)


# ----------------------------------------------------------------------------- metrics and stratification
def test_multi_label_metrics_hand_computed():
    gold = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    pred = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]])
    m = problems.multi_label_metrics(pred, gold, ["a", "b", "c"])
    # per label (tp, fp, fn): a (2, 0, 0) · b (1, 0, 1) · c (0, 1, 1); pooled (3, 1, 2)
    assert m["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert m["exact_match"] == pytest.approx(2 / 4)  # rows 2 and 3 (two empty sets match)
    assert m["per_label"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}


def test_regression_metrics_hand_computed():
    gold = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.5, 2.0, 2.0, 5.0])
    m = problems.regression_metrics(pred, gold)
    assert m["mse"] == pytest.approx((0.25 + 0 + 1 + 1) / 4) and m["mae"] == pytest.approx(2.5 / 4)
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    # ranks with a tie: pred → 1, 2.5, 2.5, 4 against 1, 2, 3, 4
    assert m["spearman"] == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert problems.regression_metrics(np.ones(4), gold)["pearson"] == 0.0  # constant predictions: no information


def test_strata_balanced_weights_and_threshold_tuning():
    y = np.array([[1, 0], [1, 1], [1, 0], [0, 0]], dtype=np.float32)
    assert problems.strata("multi_label", y).tolist() == [0, 1, 0, 2]  # label 1 is rarer; no label: its own group
    values = np.arange(100, dtype=np.float32)
    assert np.bincount(problems.strata("regression", values)).tolist() == [10] * 10
    w = problems.loss_weights("single_label", "balanced", np.array([0, 0, 0, 1]), ["a", "b"], "k")
    assert w.tolist() == pytest.approx([4 / 6, 2.0])
    pw = problems.loss_weights("multi_label", "balanced", y, ["a", "b"], "k")
    assert pw.tolist() == pytest.approx([1 / 3, 3.0])
    logits = np.log(np.array([[0.3], [0.35], [0.2], [0.1]]) / (1 - np.array([[0.3], [0.35], [0.2], [0.1]])))
    t = problems.tune_thresholds(logits, np.array([[1], [1], [0], [0]]), 0.5)
    assert 0.2 < t[0] <= 0.3  # every threshold in (0.2, 0.3] separates the two positives: the one nearest 0.5


def test_selection_metric_across_kinds():
    assert problems.selection_metrics(["single_label", "multi_label", "regression"], "auto") == [
        "error_rate", "micro_f1", "pearson"]
    assert problems.shortfall("error_rate", 0.1) == 0.1 and problems.shortfall("pearson", 0.9) == pytest.approx(0.1)
    with pytest.raises(UserError, match="eval.select_metric=pearson is not a metric of single_label tasks"):
        problems.selection_metrics(["single_label", "regression"], "pearson")
    assert problems.selection_metrics(["single_label", "multi_label"], "macro_f1") == ["macro_f1"] * 2


# ----------------------------------------------------------------------------- real runs: export, pipeline, predict
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def _run(tmp_path_factory, cache, kind: str, rows_of, field: str, *extra) -> Path:
    d = tmp_path_factory.mktemp(kind)
    files = {split: write_jsonl(d / f"{split}.jsonl", rows_of(n, seed))
             for split, n, seed in (("train", 64, 1), ("dev", 16, 2), ("test", 14, 3))}
    out = d / "out"
    run(None, out, *(f"data.{k}={v}" for k, v in files.items()), f"data.label_field={field}",
        f"data.problem_type={kind}", "train.max_steps=8", "train.eval_every=4", "train.log_every=4", *extra,
        cache=cache, script="finetune.py", config="configs/finetune/tiny.yaml", timeout=300)
    return out


@pytest.fixture(scope="module")
def multi(tmp_path_factory, cache) -> Path:
    return _run(tmp_path_factory, cache, "multi_label", multi_label_rows, "labels", "data.pos_weight=balanced",
                "data.tune_thresholds=true")


@pytest.fixture(scope="module")
def regression(tmp_path_factory, cache) -> Path:
    return _run(tmp_path_factory, cache, "regression", regression_rows, "score")


def _pipeline_scores(model_dir: Path, texts: list) -> list:
    from transformers import pipeline
    clf = pipeline("text-classification", model=str(model_dir), top_k=None, device="cpu")
    return [{d["label"]: d["score"] for d in out} for out in clf(texts, truncation=True)]


def test_multi_label_run_reports_exports_and_predicts(multi, cache, tmp_path):
    results = json.loads((multi / "eval_results.json").read_text())
    for split in ("dev", "test"):
        r = results[split]
        assert {"micro_f1", "macro_f1", "exact_match", "per_label", "n"} <= set(r)
        assert set(r["per_label"]) == set(LABELS) and all(0 <= r[k] <= 1 for k in ("micro_f1", "exact_match"))
    dev = [m for m in metrics(multi) if m.get("split") == "dev"]
    selection = [m for m in metrics(multi) if "selection" in m]
    assert [m["selection"] for m in selection] == ["micro_f1", "micro_f1"] and len(dev) == 2
    assert all(m["shortfall"] == pytest.approx(1 - d["micro_f1"]) for m, d in zip(selection, dev))

    model = multi / "hf_model"
    conf = json.loads((model / "config.json").read_text())
    recipe = json.loads((model / "bert_recipe.json").read_text())
    assert conf["problem_type"] == "multi_label_classification" and recipe["problem_type"] == "multi_label"
    assert len(recipe["thresholds"]) == 3 and len(recipe["loss_weights"]) == 3  # tuned on dev; pos_weight balanced

    rows = multi_label_rows(10, 7)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "preds.jsonl"
    proc = predict(model, inp, out, cache, "--label_field", "labels")
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    piped = _pipeline_scores(model, [r["text"] for r in rows])
    for p, hf in zip(preds, piped):
        assert p["labels"] == [lab for lab, t in zip(LABELS, recipe["thresholds"]) if p["probabilities"][lab] >= t]
        for lab in LABELS:  # the pipeline's sigmoid scores are predict's probabilities
            assert hf[lab] == pytest.approx(p["probabilities"][lab], abs=1e-5)
    scored = json.loads(Path(f"{out}.metrics.json").read_text())
    assert scored["problem_type"] == "multi_label" and scored["n"] == 10 and "micro_f1" in scored
    _check_card(model, "multi-label", "truncation=True, top_k=None", "f1", results["test"]["micro_f1"])
    card = (model / "README.md").read_text()
    assert "A label is predicted when its score reaches its threshold" in card and "Test, per label:" in card


def _check_card(model: Path, tag: str, call: str, metric_type: str, test_value: float) -> None:
    """The export's card: its kind as a tag, the pipeline call of that kind, the headline test metric."""
    from huggingface_hub import ModelCard
    card = ModelCard.load(model / "README.md")
    assert tag in card.data.tags and f'pipeline("text-classification", model="<user>/out", {call})' in card.text
    found = [r.metric_value for r in card.data.eval_results if r.dataset_split == "test" and
             r.metric_type == metric_type]
    assert found[0] == pytest.approx(test_value, abs=1e-6)


def test_regression_run_reports_exports_in_the_data_scale_and_predicts(regression, cache, tmp_path):
    results = json.loads((regression / "eval_results.json").read_text())
    assert {"pearson", "spearman", "mse", "mae", "n"} <= set(results["test"])
    model = regression / "hf_model"
    conf = json.loads((model / "config.json").read_text())
    recipe = json.loads((model / "bert_recipe.json").read_text())
    assert conf["problem_type"] == "regression" and conf["id2label"] == {"0": "score"}
    train = [r["score"] for r in regression_rows(64, 1)]
    assert recipe["target"]["mean"] == pytest.approx(np.mean(train)) and recipe["target"]["std"] == pytest.approx(
        np.std(train))

    rows = regression_rows(10, 7)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "preds.csv"
    proc = predict(model, inp, out, cache, "--label_field", "score")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        preds = list(csv.DictReader(f))
    assert list(preds[0]) == ["value"]
    values = [float(p["value"]) for p in preds]
    piped = _pipeline_scores(model, [r["text"] for r in rows])
    assert [h["score"] for h in piped] == pytest.approx(values, abs=1e-4)  # folded scale = predict's scale
    # an 8-step model predicts near the training mean, in the data's units (not standardized ones)
    assert abs(np.mean(values) - np.mean(train)) < 2 * np.std(train)
    scored = json.loads(Path(f"{out}.metrics.json").read_text())
    assert scored["problem_type"] == "regression" and scored["n"] == 10
    assert scored["mse"] == pytest.approx(np.mean((np.array(values) - [r["score"] for r in rows]) ** 2), rel=1e-3)
    _check_card(model, "regression", 'truncation=True, function_to_apply="none"', "pearsonr", results["test"]["pearson"])


# ----------------------------------------------------------------------------- early stopping
def test_early_stopping_ends_like_a_finished_run_and_keeps_its_patience_across_a_resume(tmp_path, cache):
    """lr ≈ 0: the first evaluation is the best, and patience 2 ends the 40-step run at step 3 — uninterrupted,
    and stopped at step 2 then resumed (the count of evaluations without improvement is in the checkpoint)."""
    from tiny_data import data_overrides, tiny_splits
    (tmp_path / "data").mkdir()
    data = tiny_splits(tmp_path / "data")
    common = (*data_overrides(data), "train.max_steps=40", "train.eval_every=1", "train.log_every=1",
              "optim.lr=1e-12", "eval.early_stopping_patience=2")
    outs = {}
    for name, first in (("straight", ()), ("resumed", ("train.stop_at_step=2",))):
        out = outs[name] = tmp_path / name
        proc = run(None, out, *common, *first, cache=cache, script="finetune.py",
                   config="configs/finetune/tiny.yaml", timeout=300)
        if first:
            assert not (out / "hf_model").exists()
            proc = run(None, out, *common, cache=cache, script="finetune.py", config="configs/finetune/tiny.yaml",
                       flags=("--resume",), timeout=300)
        lines = metrics(out)
        stops = [m for m in lines if m.get("event") == "early_stop"]
        assert len(stops) == 1 and stops[0]["step"] == 3 and stops[0]["best_step"] == 1, (name, stops)
        assert "2 dev evaluations without improving" in stops[0]["reason"]
        assert max(m["step"] for m in lines if "loss" in m) == 3
        assert (out / "hf_model" / "config.json").is_file() and (out / "curves.png").is_file()
        assert set(json.loads((out / "eval_results.json").read_text())) == {"dev", "test"}
        assert "early stopping: 2 dev evaluations" in proc.stdout + proc.stderr


def test_settings_of_another_problem_type_are_refused(tmp_path, cache):
    from tiny_data import data_overrides, tiny_splits
    (tmp_path / "data").mkdir()
    data = tiny_splits(tmp_path / "data")
    for overrides, match in ((["data.pos_weight=balanced"], "data.pos_weight is for multi_label tasks; a "
                                                            "single_label task takes data.class_weights"),
                             (["eval.select_metric=pearson"], "eval.select_metric=pearson is not a metric of "
                                                              "single_label tasks")):
        proc = run(None, tmp_path / "out", *data_overrides(data), *overrides, cache=cache, script="finetune.py",
                   config="configs/finetune/tiny.yaml", check=False, timeout=120)
        assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr[-2000:]
        assert match in error_lines(proc.stderr)[0]
        assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- multi-task across kinds, 2 ranks
def test_multitask_of_three_kinds_under_zero3_stops_early_on_both_ranks_and_exports_each_kind(tmp_path, cache):
    """One MFiT run with a single-label, a multi-label and a regression task on 2 ZeRO-3 ranks: the best
    checkpoint is picked by the mean shortfall (error rate, 1 − micro-F1, 1 − Pearson), early stopping ends both
    ranks at the same step (a rank left behind would hang the next collective), and every task exports as its
    kind."""
    from tiny_data import rows
    d = tmp_path / "data"
    d.mkdir()
    sets = {"topics": (rows, "label", "single_label"), "tags": (multi_label_rows, "labels", "multi_label"),
            "score": (regression_rows, "score", "regression")}
    tasks = []
    for name, (make, field, kind) in sets.items():
        files = {split: write_jsonl(d / f"{name}-{split}.jsonl", make(n, seed))
                 for split, n, seed in (("train", 48, 1), ("dev", 12, 2), ("test", 9, 3))}
        tasks.append(f"{{name: {name}, data: {{train: {files['train']}, dev: {files['dev']}, test: {files['test']}, "
                     f"label_field: {field}, problem_type: {kind}}}, text: {{max_len: 32}}}}")
    out = tmp_path / "mt"
    proc = run("cpu_zero3", out, f"tasks=[{', '.join(tasks)}]", "train.max_steps=30", "train.eval_every=2",
               "train.log_every=2", "optim.lr=1e-12", "eval.early_stopping_patience=2", cache=cache,
               script="finetune.py", config="configs/finetune/tiny_multitask.yaml", timeout=600)
    lines = metrics(out)
    stops = [m for m in lines if m.get("event") == "early_stop"]
    assert [(m["step"], m["best_step"]) for m in stops] == [(6, 2)], stops
    assert max(m["step"] for m in lines if "loss" in m) == 6
    assert all(m["world_size"] == 2 and m["zero_stage"] == 3 for m in lines if "loss" in m)
    selection = [m for m in lines if "selection" in m]
    dev = {(m["step"], m["task"]): m for m in lines if m.get("split") == "dev"}
    for m in selection:
        want = (dev[m["step"], "topics"]["error_rate"] + 1 - dev[m["step"], "tags"]["micro_f1"]
                + 1 - dev[m["step"], "score"]["pearson"]) / 3
        assert m["selection"] == "error_rate+micro_f1+pearson" and m["shortfall"] == pytest.approx(want)
    results = json.loads((out / "eval_results.json").read_text())
    assert "error_rate" in results["topics"]["test"] and "micro_f1" in results["tags"]["test"]
    assert "pearson" in results["score"]["test"]
    for name, (_, _, kind) in sets.items():
        recipe = json.loads((out / "tasks" / name / "hf_model" / "bert_recipe.json").read_text())
        assert recipe["problem_type"] == kind
    assert proc.returncode == 0


# ----------------------------------------------------------------------------- tables that name their metric
def test_recipe_table_and_grid_report_name_the_metric_of_each_kind(tmp_path):
    from trainer.config import GridConfig
    from trainer.grid_report import write_report
    from trainer.stages.recipe import write_results
    table = {"trec": {"FiT": 0.05, "MFiT": 0.04}, "tags": {"FiT": 0.7, "MFiT": 0.75}, "score": {"FiT": 0.8}}
    write_results(tmp_path, table, ["FiT", "MFiT"], metrics={"trec": "error_rate", "tags": "micro_f1",
                                                              "score": "pearson"})
    md = (tmp_path / "results.md").read_text()
    assert "| trec | 5.00 | 4.00 |" in md and "| tags (micro-F1) | 70.00 | 75.00 |" in md
    assert "| score (Pearson) | 0.8000 | – |" in md and (tmp_path / "results.png").is_file()
    rows = [{"point": f"p{i}", "params": {"optim.lr": lr, "seed": 42}, "seed": 42, "metric": "micro_f1",
             "dev_score": s, "test_score": s - 0.01, "dev_curve": []} for i, (lr, s) in enumerate([(1e-4, 0.6),
                                                                                               (2e-4, 0.8)])]
    cfg = GridConfig(output_dir=str(tmp_path), axes={"optim.lr": [1e-4, 2e-4]}, study="generic")
    write_report(cfg, rows, tmp_path)
    report = (tmp_path / "results.md").read_text()
    assert "| optim.lr | dev micro-F1 | test micro-F1 | seeds |" in report and "micro-F1 (%) as mean" in report
    assert "Highest test micro-F1: optim.lr=0.0002" in report


@pytest.mark.parametrize("kind", ["multi_label", "regression"])
@pytest.mark.parametrize("pool", ["mean", "max", "attention"])
def test_hierarchical_chunks_pool_into_one_prediction_per_document_of_each_kind(kind, pool):
    """A long document's chunks pool into one multi-label / regression prediction, with the kind's loss, and its
    gradient reaches the encoder through every chunk pooling."""
    import torch
    from test_classifier import tiny_bert
    from trainer.classifier import Classifier, HeadSpec
    from trainer.config import HeadConfig, TextConfig
    text = TextConfig(strategy="hierarchical", max_len=16, max_chunks=3, chunk_pool=pool)
    spec = HeadSpec(3 if kind == "multi_label" else 1, text, kind, target_mean=2.0, target_std=0.5)
    model = Classifier(tiny_bert(), {"default": spec}, HeadConfig())
    ids = torch.randint(5, 120, (5, 16))  # 5 chunks of 2 documents: 3 + 2
    doc_index = torch.tensor([0, 0, 0, 1, 1])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) if kind == "multi_label" else torch.tensor([2.5, 1.0])
    loss, out = model(ids, torch.ones_like(ids), labels=labels, doc_index=doc_index)
    assert out.shape == (2, spec.num_outputs) and torch.isfinite(loss)
    loss.backward()
    assert model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    if kind == "regression":  # the loss is in standardized units; the output in the data's
        raw = (out[:, 0] - 2.0) / 0.5
        assert loss.item() == pytest.approx(((raw - (labels - 2.0) / 0.5) ** 2).mean().item(), rel=1e-5)
