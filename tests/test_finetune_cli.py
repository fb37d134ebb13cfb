"""launch/finetune.py and launch/predict.py as a user runs them (one plain process, tiny data, 3 steps)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launching import REPO, env, error_lines, metrics, run
from tiny_data import LABELS, TINY, data_overrides, rows, tiny_splits, write_jsonl


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return tiny_splits(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache, data) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    run(None, out, *data_overrides(data), *TINY, "optim.layer_decay=0.9", "train.log_every=1", cache=cache,
        script="finetune.py", config="configs/finetune/tiny.yaml", check=True, timeout=300)
    return out


# ----------------------------------------------------------------------------- a real run
def test_run_writes_groups_metrics_and_results(trained):
    groups = json.loads((trained / "param_groups.json").read_text())
    assert len(groups) > 2  # layer-wise decay: several learning rates
    assert [g["index"] for g in groups] == list(range(len(groups)))
    lrs = sorted({g["lr"] for g in groups})
    assert lrs[-1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.9 ** 4)
    assert all(g["num_params"] > 0 for g in groups)

    lines = metrics(trained)
    train_lines = [m for m in lines if "loss" in m]
    dev_lines = [m for m in lines if m.get("split") == "dev"]
    selection = [m for m in lines if "selection" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    assert all(isinstance(m["lr"], list) and len(m["lr"]) == len(groups) for m in train_lines)
    assert [m["step"] for m in dev_lines] == [3]
    assert all(k in dev_lines[0] for k in ("accuracy", "error_rate", "macro_f1"))
    # the best checkpoint is picked by the dev error rate (the default for a single-label task)
    assert [(m["step"], m["selection"], m["improved"]) for m in selection] == [(3, "error_rate", True)]
    assert selection[0]["shortfall"] == dev_lines[0]["error_rate"]

    results = json.loads((trained / "eval_results.json").read_text())
    assert set(results) == {"dev", "test"}
    for split, n in (("dev", 12), ("test", 9)):
        r = results[split]
        for key in ("accuracy", "error_rate", "macro_f1", "confusion_matrix", "per_class"):
            assert key in r, (split, key)
        assert [r["per_class"][lab]["support"] for lab in LABELS] == [n // 3] * 3
        assert r["accuracy"] + r["error_rate"] == pytest.approx(1.0)
        cm = r["confusion_matrix"]
        assert len(cm) == 3 and all(len(row) == 3 for row in cm)
        assert sum(map(sum, cm)) == n
        assert [sum(row) for row in cm] == [n // 3] * 3  # rows are gold: each class n/3 times
        assert r["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(3)) / n)
    recipe = json.loads((trained / "hf_model" / "bert_recipe.json").read_text())
    assert recipe["labels"] == LABELS and recipe["format"] == "hf"


def predict(model: Path, inp: Path, out: Path, cache: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "predict.py"), "--model", str(model), "--input", str(inp),
           "--output", str(out), *flags]
    return subprocess.run(cmd, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=300)


def test_predict_on_exported_model(trained, cache, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": r["text"]} for r in rows(7, 9)])
    out = tmp_path / "preds.jsonl"
    proc = predict(trained / "hf_model", inp, out, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 7
    for p in preds:
        assert p["label"] in LABELS
        assert set(p["probabilities"]) == set(LABELS)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)

    before = out.read_bytes()
    proc = predict(trained / "hf_model", inp, out, cache)
    assert proc.returncode == 2
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "--overwrite" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == before

    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "ball goal"}, {"text": "soup"}])
    proc = predict(trained / "hf_model", short, out, cache, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 2
