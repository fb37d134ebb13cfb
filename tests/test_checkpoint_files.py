"""Checkpoint completeness (manifest: sizes + SHA-256), the fallback to the newest intact checkpoint, and the
global batch kept when a resume changes the number of ranks."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import log_lines
from trainer.checkpoint import (_files, _write_manifest, checkpoint_root, is_complete, latest_complete,
                                list_checkpoints, manifest_entries)
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.reshard import keep_global_batch


@pytest.fixture
def logged():
    """The job log's messages (tests/log_lines.py) while the test runs."""
    with log_lines.logged() as lines:
        yield lines


def _make(out: Path, step: int, complete: bool = True, name: str | None = None) -> Path:
    path = checkpoint_root(out) / (name or f"step_{step:08d}")
    (path / "pytorch_model").mkdir(parents=True)
    (path / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"m" * (100 + step))
    (path / "optimizer.bin").write_bytes(b"o" * 64)
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 2, "global_batch": 32}))
    (path / "random_states_0.pkl").write_bytes(b"")  # empty files count too
    if complete:
        _write_manifest(path, manifest_entries(path, _files(path)))
    return path


def test_manifest_lists_every_file(tmp_path):
    path = _make(tmp_path, 5)
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert {k: v["size"] for k, v in files.items()} == {
        "optimizer.bin": 64, "pytorch_model/mp_rank_00_model_states.pt": 105, "random_states_0.pkl": 0,
        "trainer_state.json": (path / "trainer_state.json").stat().st_size}
    assert files["optimizer.bin"]["sha256"] == hashlib.sha256(b"o" * 64).hexdigest()
    assert not (path / "manifest.json.tmp").exists()
    assert is_complete(path)


def test_incomplete_without_manifest(tmp_path):
    assert not is_complete(_make(tmp_path, 5, complete=False))
    assert not is_complete(tmp_path / "does-not-exist")


@pytest.mark.parametrize("damage", ["truncate", "grow", "delete", "delete_nested", "bad_manifest", "no_files_key"])
def test_damage_makes_incomplete(tmp_path, damage):
    path = _make(tmp_path, 5)
    if damage == "truncate":
        (path / "optimizer.bin").write_bytes(b"o" * 10)
    elif damage == "grow":
        (path / "optimizer.bin").write_bytes(b"o" * 65)
    elif damage == "delete":
        (path / "trainer_state.json").unlink()
    elif damage == "delete_nested":
        (path / "pytorch_model" / "mp_rank_00_model_states.pt").unlink()
    elif damage == "bad_manifest":
        (path / "manifest.json").write_text('{"files": {"optimizer.bin": 6')  # torn write
    else:
        (path / "manifest.json").write_text('{"sizes": {}}')
    assert not is_complete(path)


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path, logged):
    first = _make(tmp_path, 100)
    second = _make(tmp_path, 200)
    (second / "optimizer.bin").write_bytes(b"x" + b"o" * 63)  # a flipped byte: same size
    assert is_complete(second) and not is_complete(second, verify=True)
    assert latest_complete(tmp_path, verify=True) == first
    assert len(logged) == 1 and str(second) in logged[0]
    logged.clear()
    assert latest_complete(tmp_path, verify=True, quiet=True) == first and logged == []


def test_extra_file_does_not_break_completeness(tmp_path):
    path = _make(tmp_path, 5)
    (path / "notes.txt").write_text("added later")
    assert is_complete(path)


@pytest.mark.parametrize("content", ["null", "[]", '{"files": []}'])
def test_wrong_shape_manifest_is_incomplete(tmp_path, content):
    path = _make(tmp_path, 5)
    (path / "manifest.json").write_text(content)
    assert not is_complete(path)


def test_list_checkpoints_numeric_order_and_filtering(tmp_path):
    _make(tmp_path, 9, name="step_9")
    _make(tmp_path, 10, name="step_10")
    _make(tmp_path, 100)
    _make(tmp_path, 200, name=".tmp-step_00000200")
    _make(tmp_path, 300, name="step_latest")
    (checkpoint_root(tmp_path) / "step_400").write_text("a file, not a dir")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_9", "step_10", "step_00000100"]
    assert list_checkpoints(tmp_path / "no-run") == []


def test_latest_complete_picks_newest(tmp_path, logged):
    _make(tmp_path, 100)
    newest = _make(tmp_path, 200)
    _make(tmp_path, 300, name=".tmp-step_00000300")  # torn save in progress: never a candidate
    assert latest_complete(tmp_path) == newest
    assert logged == []


def test_truncated_newest_falls_back(tmp_path, logged):
    first = _make(tmp_path, 100)
    second = _make(tmp_path, 200)
    third = _make(tmp_path, 300)
    (third / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 7)  # truncated
    assert latest_complete(tmp_path) == second
    assert len(logged) == 1 and str(third) in logged[0]
    (second / "manifest.json").unlink()  # torn before the manifest was written
    logged.clear()
    assert latest_complete(tmp_path) == first
    assert len(logged) == 2


def test_latest_complete_none(tmp_path):
    assert latest_complete(tmp_path) is None
    _make(tmp_path, 100, complete=False)
    assert latest_complete(tmp_path, quiet=True) is None


def _train(micro: int, accum: int) -> TrainConfig:
    return TrainConfig(micro_batch_size=micro, grad_accum=accum)


@pytest.mark.parametrize("world,micro,accum,want", [
    (2, 16, 1, (16, 1)),  # same world size: untouched
    (1, 16, 1, (16, 2)),  # 2 -> 1: accumulate twice
    (4, 16, 1, (8, 1)),  # 2 -> 4: smaller micro-batches
    (3, 16, 2, None),  # 32 samples cannot be split over 3 ranks
    (8, 16, 1, (4, 1)),
])
def test_keep_global_batch(tmp_path, world, micro, accum, want, logged):
    _make(tmp_path, 100)  # written by 2 ranks, global batch 32
    if want is None:
        with pytest.raises(UserError, match="cannot split it evenly"):
            keep_global_batch(tmp_path, True, _train(micro, accum), world)
        return
    got = keep_global_batch(tmp_path, True, _train(micro, accum), world)
    assert (got.micro_batch_size, got.grad_accum) == want
    assert got.micro_batch_size * got.grad_accum * world == 32
    assert len(logged) == (0 if world == 2 else 1)
    # no resume, or nothing to resume: the config as given
    assert keep_global_batch(tmp_path, False, _train(micro, accum), world) == _train(micro, accum)
    assert keep_global_batch(tmp_path / "none", True, _train(micro, accum), world) == _train(micro, accum)
