"""Bad input to the real entry point: one `error: ...` line, exit code 2, nothing in the output dir touched."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from launching import REPO, run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def expect_error(out: Path, cache: Path, *overrides: str, match: str, flags=()):
    before = snapshot(out)
    proc = run(None, out, *overrides, cache=cache, flags=flags, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and match in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before, "the output dir changed"
    return errors[0]


def corpus(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_unknown_key_and_wrong_type(tmp_path, cache):
    expect_error(tmp_path / "o", cache, "optim.lrr=1e-4", match="unknown config key 'optim.lrr'")
    expect_error(tmp_path / "o", cache, "train.max_steps=ten", match="'train.max_steps' must be int")
    expect_error(tmp_path / "o", cache, "optim.scheduler=warmup_cosine", match="'optim.scheduler' must be one of")


def test_missing_empty_and_fieldless_corpora(tmp_path, cache):
    out = tmp_path / "o"
    expect_error(out, cache, f"data.corpora=[{{path: {tmp_path / 'nope.txt'}}}]", match="corpus file not found")
    empty = corpus(tmp_path, "empty.txt", [""])
    expect_error(out, cache, f"data.corpora=[{{path: {empty}}}]", match="holds no documents")
    jl = tmp_path / "c.jsonl.gz"
    with gzip.open(jl, "wt") as f:
        f.write(json.dumps({"review": "a good film"}) + "\n")
    expect_error(out, cache, f"data.corpora=[{{path: {jl}, text_field: text}}]", match="no field 'text'")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    expect_error(out, cache, f"data.corpora=[{{path: {bad}}}]", match="not valid UTF-8")


def test_deepspeed_json_with_its_own_optimizer_is_refused(tmp_path, cache):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    expect_error(tmp_path / "o", cache, f"distributed.deepspeed_config={path}", match="has a 'optimizer' section")


def test_seq_len_above_position_limit(tmp_path, cache):
    expect_error(tmp_path / "o", cache, "data.seq_len=256", match="exceeds the model's position limit (128")


def test_existing_run_is_not_overwritten_without_a_flag(tmp_path, cache):
    out = tmp_path / "o"
    run(None, out, "train.max_steps=2", "train.log_every=1", cache=cache)
    expect_error(out, cache, "train.max_steps=2", match="already holds a run; pass --resume")
    expect_error(out, cache, "data.seq_len=32", flags=["--resume"], match="config key 'data.seq_len' differs")
    # --overwrite really replaces it
    run(None, out, "train.max_steps=1", "train.log_every=1", cache=cache, flags=["--overwrite"])
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, cache):
    out = tmp_path / "o"
    run(None, out, "train.max_steps=4", "train.log_every=2", "train.save_every=2", cache=cache)
    before = snapshot(out / "checkpoints")
    proc = run(None, out, "train.max_steps=40", "train.log_every=2", "train.save_every=2", "optim.lr=1e6",
               cache=cache, flags=["--resume"], check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "loss is nan at step" in errors[0] or "loss is inf at step" in errors[0]
    assert snapshot(out / "checkpoints") == before
