"""launch/finetune.py and launch/predict.py as a user runs them (one plain process, tiny data, 3 steps)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launching import REPO, env, error_lines, metrics, run

LABELS = ["food", "sport", "tech"]
WORDS = {"sport": "ball goal team match player score", "food": "bread cheese soup apple dinner cook",
         "tech": "computer code server chip data network"}
TINY = ("train.max_steps=3", "train.eval_every=3", "data.eval_batch_size=64")


def rows(n: int, seed: int) -> list[dict]:
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % 3]
        words = WORDS[label].split()
        out.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 25))), "label": label})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(d / "train.jsonl", rows(48, 1)), "dev": write_jsonl(d / "dev.jsonl", rows(12, 2)),
            "test": write_jsonl(d / "test.jsonl", rows(9, 3)), "dir": d}


def data_overrides(data, **replace) -> list[str]:
    files = {k: data[k] for k in ("train", "dev", "test")}
    files.update(replace)
    return [f"data.{k}={v}" for k, v in files.items()]


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
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    assert all(isinstance(m["lr"], list) and len(m["lr"]) == len(groups) for m in train_lines)
    assert [m["step"] for m in dev_lines] == [3]
    assert all(k in dev_lines[0] for k in ("accuracy", "error_rate", "macro_f1"))

    results = json.loads((trained / "eval_results.json").read_text())
    assert set(results) == {"dev", "test"}
    for split, n in (("dev", 12), ("test", 9)):
        r = results[split]
        for key in ("accuracy", "error_rate", "macro_f1", "confusion_matrix"):
            assert key in r, (split, key)
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


# ----------------------------------------------------------------------------- bad input
def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def expect_error(tmp_path: Path, cache: Path, data, *overrides: str, match: str, **files) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("the user's own file\n")
    before = snapshot(out)
    proc = run(None, out, *data_overrides(data, **files), *TINY, *overrides, cache=cache, script="finetune.py",
               config="configs/finetune/tiny.yaml", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and match in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before, "the output dir changed"
    return errors[0]


def test_unknown_test_label(tmp_path, cache, data):
    test = write_jsonl(tmp_path / "test.jsonl", rows(4, 5) + [{"text": "a new kind of text", "label": "music"}])
    err = expect_error(tmp_path, cache, data, match="label 'music' is not among the training labels", test=test)
    assert str(test) in err and "row 5" in err


def test_missing_label_field(tmp_path, cache, data):
    dev = write_jsonl(tmp_path / "dev.jsonl", rows(2, 5) + [{"text": "no label here"}])
    err = expect_error(tmp_path, cache, data, match="no label field 'label'", dev=dev)
    assert str(dev) in err and "row 3" in err


def test_empty_text(tmp_path, cache, data):
    train = write_jsonl(tmp_path / "train.jsonl", rows(5, 5) + [{"text": "  ", "label": "food"}] + rows(3, 6))
    err = expect_error(tmp_path, cache, data, match="empty text", train=train)
    assert str(train) in err and "row 6" in err


def test_non_utf8(tmp_path, cache, data):
    train = tmp_path / "train.jsonl"
    train.write_bytes(json.dumps(rows(3, 5)[0]).encode() + b"\n" + '{"text": "caf\xe9", "label": "food"}\n'
                      .encode("latin-1"))
    err = expect_error(tmp_path, cache, data, match="not valid UTF-8", train=train)
    assert str(train) in err


def test_missing_train_file(tmp_path, cache, data):
    expect_error(tmp_path, cache, data, match=f"data file not found: {tmp_path / 'nope.jsonl'}",
                 train=tmp_path / "nope.jsonl")


@pytest.mark.parametrize("override,match", [
    ("optim.layer_decay=0", "optim.layer_decay (ξ) must be in (0, 1]"),
    ("optim.layer_decay=1.5", "optim.layer_decay (ξ) must be in (0, 1]"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("text.strategy=middle", "'text.strategy' must be one of"),
    ("head.layers=99", "head.layers entry 99 is outside 0..4"),
])
def test_bad_settings(tmp_path, cache, data, override, match):
    expect_error(tmp_path, cache, data, override, match=match)


def test_max_len_at_roberta_position_limit(tmp_path, cache, data):
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(["ball goal team"] * 60), "label": lab}
                                                 for lab in LABELS * 2])
    expect_error(tmp_path, cache, data, "model.config.model_type=roberta", "text.max_len=128", match="text.max_len",
                 train=long, dev=long, test=long)
