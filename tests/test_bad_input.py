"""Bad input, catalogued: corpus, dataset, config, DeepSpeed JSON, checkpoint dir and command line.

Every row runs a real entry point (one plain process) against an output dir that already holds a finished run
plus a file of the user's, passing --overwrite unless the row is about the flags themselves: the run must stop
with exactly one `error: ...` line naming the problem, exit code 2, no traceback, and every file in that dir
must be byte-for-byte as before — bad input is found before anything is replaced."""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from launching import REPO, error_lines, run
from tiny_data import TINY, data_overrides, rows, tiny_splits, write_jsonl

PRE, FT = "pretrain", "finetune"
CONFIGS = {PRE: "configs/pretrain/tiny.yaml", FT: "configs/finetune/tiny.yaml"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return tiny_splits(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache, data) -> dict:
    """One finished run per entry point, copied into each row's tmp dir."""
    root = tmp_path_factory.mktemp("finished")
    run(None, root / PRE, "train.max_steps=2", "train.log_every=1", "train.save_every=1", cache=cache)
    run(None, root / FT, *data_overrides(data), *TINY, cache=cache, script="finetune.py", config=CONFIGS[FT])
    return {PRE: root / PRE, FT: root / FT}


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def text_file(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


def ds_json(tmp: Path, **changes) -> Path:
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    cfg.update(changes)
    return text_file(tmp, "ds.json", json.dumps(cfg).encode())


def gz_jsonl(tmp: Path) -> Path:
    with gzip.open(tmp / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"review": "a good film"}) + "\n")
    return tmp / "c.jsonl.gz"


def corpora(path: Path, extra: str = "") -> str:
    return f"data.corpora=[{{path: {path}{extra}}}]"


def tear_every_checkpoint(out: Path) -> None:
    for ckpt in (out / "checkpoints").glob("step_*"):
        shard = max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)


@dataclass
class Bad:
    area: str
    script: str
    args: Callable  # (tmp dir, data) -> overrides and flags
    match: str
    flags: tuple = ("--overwrite",)
    setup: Callable = field(default=lambda out: None)  # damages the copied run first (part of the "before")


CATALOGUE = {
    # corpus
    "corpus file missing": Bad("corpus", PRE, lambda t, d: [corpora(t / "nope.txt")],
                               "corpus file not found"),
    "corpus empty": Bad("corpus", PRE, lambda t, d: [corpora(text_file(t, "e.txt", b"\n"))],
                        "holds no documents"),
    "corpus jsonl without its text field": Bad(
        "corpus", PRE, lambda t, d: [corpora(gz_jsonl(t), ", text_field: text")], "no field 'text'"),
    "corpus not UTF-8": Bad(
        "corpus", PRE, lambda t, d: [corpora(text_file(t, "l.txt", "caf\xe9".encode("latin-1")))],
        "not valid UTF-8"),
    # classification data
    "test label unseen in training": Bad(
        "dataset", FT, lambda t, d: data_overrides(d, test=write_jsonl(t / "test.jsonl", rows(4, 5) + [
            {"text": "a new kind of text", "label": "music"}])), "label 'music' is not among the training labels"),
    "label field missing": Bad(
        "dataset", FT, lambda t, d: data_overrides(d, dev=write_jsonl(t / "dev.jsonl", rows(2, 5) + [
            {"text": "no label here"}])), "row 3: no label field 'label'"),
    "empty text": Bad(
        "dataset", FT, lambda t, d: data_overrides(d, train=write_jsonl(t / "train.jsonl", rows(5, 5) + [
            {"text": "  ", "label": "food"}] + rows(3, 6))), "row 6"),
    "dataset not UTF-8": Bad(
        "dataset", FT, lambda t, d: data_overrides(d, train=text_file(
            t, "train.jsonl", '{"text": "caf\xe9", "label": "food"}\n'.encode("latin-1"))), "not valid UTF-8"),
    "train file missing": Bad("dataset", FT, lambda t, d: data_overrides(d, train=t / "nope.jsonl"),
                              "data file not found"),
    "mixed label types": Bad(
        "dataset", FT, lambda t, d: data_overrides(d, train=write_jsonl(t / "train.jsonl", rows(4, 5) + [
            {"text": "ball goal", "label": 1}])), "mixed label types — row 1 has the text 'food', row 5 the number 1"),
    # (the other problem-type rows — NaN / text targets, unseen multi-label labels, a separator that splits
    # nothing — are checked in-process in test_problem_types.py; these two go through the CLI's exit path)
    "list label in a single_label task": Bad(
        "dataset", FT, lambda t, d: data_overrides(d, train=write_jsonl(t / "train.jsonl", [
            {"text": "bread ball", "label": ["food", "sport"]}] + [{**r, "label": [r["label"]]} for r in rows(4, 5)])),
        "row 1: label ['food', 'sport'] is a list — texts with several labels are data.problem_type=multi_label"),
    "regression target not finite": Bad(
        "dataset", FT, lambda t, d: [*data_overrides(d, train=write_jsonl(t / "train.jsonl", [
            {"text": "ball", "label": 1.5}, {"text": "soup", "label": 2}, {"text": "code", "label": math.inf}])),
            "data.problem_type=regression"], "row 3: regression target inf is not a finite number"),
    "text column missing": Bad(
        "dataset", FT, lambda t, d: data_overrides(d, train=text_file(
            t, "train.csv", b"review,label\nbread and soup,food\nball goal,sport\n")), "no column 'text'"),
    "empty split": Bad("dataset", FT, lambda t, d: data_overrides(d, test=text_file(t, "test.jsonl", b"")),
                       "test.jsonl: no examples"),
    # run config
    "unknown key": Bad("config", PRE, lambda t, d: ["optim.lrr=1e-4"], "unknown config key 'optim.lrr'"),
    "wrong type": Bad("config", PRE, lambda t, d: ["train.max_steps=ten"], "'train.max_steps' must be int"),
    "unknown schedule": Bad("config", PRE, lambda t, d: ["optim.scheduler=warmup_cosine"],
                            "'optim.scheduler' must be one of"),
    "xi = 0": Bad("config", FT, lambda t, d: [*data_overrides(d), "optim.layer_decay=0"],
                  "optim.layer_decay (ξ) must be in (0, 1]"),
    "xi > 1": Bad("config", FT, lambda t, d: [*data_overrides(d), "optim.layer_decay=1.5"],
                  "optim.layer_decay (ξ) must be in (0, 1]"),
    "lr = 0": Bad("config", FT, lambda t, d: [*data_overrides(d), "optim.lr=0"], "optim.lr must be > 0"),
    "unknown truncation strategy": Bad("config", FT, lambda t, d: [*data_overrides(d), "text.strategy=middle"],
                                       "'text.strategy' must be one of"),
    "layer index out of range": Bad("config", FT, lambda t, d: [*data_overrides(d), "head.layers=99"],
                                    "head.layers entry 99 is outside 0..4"),
    "seq_len above the position limit": Bad("config", PRE, lambda t, d: ["data.seq_len=256"],
                                            "exceeds the model's position limit (128"),
    "config file not YAML": Bad("config", PRE, lambda t, d: ["--config", str(text_file(t, "c.yaml", b"seed: [1\n"))],
                                "is not valid YAML"),
    # DeepSpeed JSON
    "DeepSpeed JSON with its own optimizer": Bad(
        "deepspeed", PRE, lambda t, d: [f"distributed.deepspeed_config={ds_json(t, optimizer={'type': 'AdamW'})}"],
        "has a 'optimizer' section"),
    "DeepSpeed JSON not JSON": Bad(
        "deepspeed", PRE, lambda t, d: [f"distributed.deepspeed_config={text_file(t, 'ds.json', b'{x: 2')}"],
        "is not valid JSON"),
    "DeepSpeed JSON batch size against the run config": Bad(
        "deepspeed", PRE, lambda t, d: [f"distributed.deepspeed_config={ds_json(t, train_micro_batch_size_per_gpu=4)}"],
        "train_micro_batch_size_per_gpu=4"),
    "DeepSpeed JSON missing": Bad("deepspeed", PRE, lambda t, d: [f"distributed.deepspeed_config={t / 'no.json'}"],
                                  "DeepSpeed config not found"),
    # output / checkpoint dir
    "run exists, no flag": Bad("checkpoint dir", PRE, lambda t, d: [], "already holds a run; pass --resume", flags=()),
    "resume with other data settings": Bad("checkpoint dir", PRE, lambda t, d: ["data.seq_len=32"],
                                           "config key 'data.seq_len' differs", flags=("--resume",)),
    "resume, every checkpoint torn": Bad("checkpoint dir", PRE, lambda t, d: [], "no intact checkpoint",
                                         flags=("--resume",), setup=tear_every_checkpoint),
    # command line
    "misspelt flag": Bad("cli", PRE, lambda t, d: ["--resmue"], "unrecognized arguments: --resmue"),
    "override without '='": Bad("cli", PRE, lambda t, d: ["optim.lr"], "must look like key.sub=value"),
    "--resume with --overwrite": Bad("cli", PRE, lambda t, d: [], "--resume and --overwrite exclude each other",
                                     flags=("--resume", "--overwrite")),
}


def test_the_catalogue_covers_every_area():
    areas = {bad.area for bad in CATALOGUE.values()}
    assert areas == {"corpus", "dataset", "config", "deepspeed", "checkpoint dir", "cli"}
    assert len(CATALOGUE) >= 32


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input(name, tmp_path, cache, data, finished):
    bad = CATALOGUE[name]
    out = tmp_path / "out"
    shutil.copytree(finished[bad.script], out)
    (out / "notes.txt").write_text("the user's own file\n")
    bad.setup(out)
    before = snapshot(out)
    args = bad.args(tmp_path, data)
    config = CONFIGS[bad.script]
    if "--config" in args:  # the row brings its own config file
        i = args.index("--config")
        config, args = args[i + 1], args[:i] + args[i + 2:]
    proc = run(None, out, *args, cache=cache, flags=bad.flags, script=f"{bad.script}.py", config=config,
               check=False, timeout=300)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and bad.match in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before, "the output dir changed"


def test_overwrite_really_replaces_a_run(tmp_path, cache, finished):
    out = tmp_path / "out"
    shutil.copytree(finished[PRE], out)
    run(None, out, "train.max_steps=1", "train.log_every=1", cache=cache, flags=["--overwrite"])
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, cache):
    out = tmp_path / "o"
    run(None, out, "train.max_steps=4", "train.log_every=2", "train.save_every=2", cache=cache)
    before = snapshot(out / "checkpoints")
    proc = run(None, out, "train.max_steps=40", "train.log_every=2", "train.save_every=2", "optim.lr=1e6",
               cache=cache, flags=["--resume"], check=False)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "loss is nan at step" in errors[0] or "loss is inf at step" in errors[0]
    assert snapshot(out / "checkpoints") == before
