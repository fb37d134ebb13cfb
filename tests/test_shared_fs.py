"""Multi-node on a shared filesystem: one preparer per corpus cache entry (lock file, collision-free temp names,
stale-lock take-over), and checkpoint decisions made by the main process and broadcast rather than read by each
rank from a filesystem whose view may differ between nodes. No GPU: processes are forked, ranks talk over gloo."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import threading
import time
import traceback
from pathlib import Path

import pytest

from trainer import checkpoint
from trainer.config import CorpusSource
from log_lines import logged
from trainer.corpus import prepare as prepare_mod
from trainer.corpus.prepare import cache_key, prepare_corpus
from trainer.data import cache as cache_mod
from trainer.data.builtin import grammar_documents
from trainer.errors import UserError

pytestmark = pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")


def _corpus(tmp_path: Path) -> CorpusSource:
    p = tmp_path / "a.txt"
    p.write_text("\n".join(grammar_documents(200, seed=7)))
    return CorpusSource(path=str(p))


def _slow_build(monkeypatch, seconds: float, counter=None):
    """Make every build take at least `seconds` (so concurrent preparers overlap), and count builds."""
    real = prepare_mod._build

    def build(*args, **kw):
        if counter is not None:
            counter.append(args[3])  # the temp dir it builds into
        time.sleep(seconds)
        return real(*args, **kw)

    monkeypatch.setattr(prepare_mod, "_build", build)


def _fast_lock(monkeypatch, stale: float = 60.0):
    for name, value in (("LOCK_POLL_S", 0.02), ("LOCK_HEARTBEAT_S", 0.05), ("LOCK_STALE_S", stale)):
        monkeypatch.setattr(cache_mod, name, value)


def _same_bytes(a, b) -> bool:
    return a.meta == b.meta and all(x.read_bytes() == y.read_bytes() for (x, _), (y, _) in zip(a.shards(), b.shards()))


# ----------------------------------------------------------------------------- one preparer per cache entry
def _prepare_in_process(src, tokenizer, cache, barrier, log_path):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    lines = []
    try:
        barrier.wait(30)
        with logged() as logs:
            prepared = prepare_corpus(src, tokenizer, 32, cache)
        lines += logs
        lines.append(f"RESULT {prepared.path}")
    except BaseException:
        lines.append("ERROR " + traceback.format_exc())
    Path(log_path).write_text(json.dumps({"pid": os.getpid(), "lines": lines}))


def test_concurrent_processes_prepare_once(tmp_path, tiny_tokenizer, monkeypatch):
    """Two "nodes" (processes) prepare the same corpus into one cache at the same moment: it is tokenized once, the
    other waits for it (and says for whom), both read the same finished shards, and nothing is left behind."""
    _fast_lock(monkeypatch)
    _slow_build(monkeypatch, 0.5)  # inherited by the forked processes
    src, cache = _corpus(tmp_path), tmp_path / "shared-cache"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    logs = [tmp_path / f"log{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_prepare_in_process, args=(src, tiny_tokenizer, cache, barrier, str(log)))
             for log in logs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    runs = [json.loads(log.read_text()) for log in logs]
    for run in runs:
        assert not any(ln.startswith("ERROR") for ln in run["lines"]), run["lines"]
    built = [run for run in runs if any(ln.startswith("prepared ") for ln in run["lines"])]
    assert len(built) == 1, [run["lines"] for run in runs]  # tokenized exactly once
    waiter = next(run for run in runs if run is not built[0])
    assert any("waiting for" in ln and f"pid {built[0]['pid']}" in ln for ln in waiter["lines"]), waiter["lines"]
    results = {ln for run in runs for ln in run["lines"] if ln.startswith("RESULT")}
    key = cache_key(src, tiny_tokenizer, 32)
    assert results == {f"RESULT {cache / key}"}
    assert sorted(os.listdir(cache)) == [key]  # no lock, no temp dir left
    monkeypatch.undo()
    alone = prepare_corpus(src, tiny_tokenizer, 32, tmp_path / "alone")
    assert _same_bytes(prepare_corpus(src, tiny_tokenizer, 32, cache), alone)


def test_same_pid_preparers_do_not_collide(tmp_path, tiny_tokenizer, monkeypatch):
    """Containers in their own PID namespaces share pids (and threads share one): two preparers with the same pid
    and host prepare the same corpus at once — one build, the other reads its shards."""
    _fast_lock(monkeypatch)
    builds: list[Path] = []
    _slow_build(monkeypatch, 0.4, builds)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    src, cache = _corpus(tmp_path), tmp_path / "cache"
    results, errors = [], []
    start = threading.Barrier(2)

    def go():
        try:
            start.wait(10)
            results.append(prepare_corpus(src, tiny_tokenizer, 32, cache))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(builds) == 1 and len(results) == 2
    assert results[0].path == results[1].path and results[0].meta == results[1].meta
    assert sorted(os.listdir(cache)) == [results[0].path.name]


def test_temp_names_unique_for_same_host_and_pid(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(socket, "gethostname", lambda: "node")
    final = tmp_path / "abcd"
    names = {cache_mod.temp_name(final, cache_mod.owner_tag()) for _ in range(50)}
    assert len(names) == 50
    assert all(n.name.startswith(".abcd.tmp-node-1-") for n in names)
    made = [cache_mod.temp_dir(final, cache_mod.owner_tag()) for _ in range(2)]
    assert made[0] != made[1] and all(m.is_dir() for m in made)


def test_stale_lock_of_a_dead_preparer_is_taken_over(tmp_path, tiny_tokenizer, monkeypatch):
    """A preparer killed mid-way leaves its lock and temp dir: after LOCK_STALE_S without a heartbeat the next one
    takes over, removes the dead one's temp dir, and prepares."""
    _fast_lock(monkeypatch, stale=0.3)
    src, cache = _corpus(tmp_path), tmp_path / "cache"
    cache.mkdir()
    key = cache_key(src, tiny_tokenizer, 32)
    dead = cache / f".{key}.tmp-othernode-7-deadbeef"
    (dead / "shard_00000.bin").parent.mkdir()
    (dead / "shard_00000.bin").write_bytes(b"half")
    (cache / f".{key}.lock").write_text(json.dumps({"host": "othernode", "pid": 7, "tag": "othernode-7-deadbeef",
                                                      "since": "earlier"}))
    with logged() as logs:
        prepared = prepare_corpus(src, tiny_tokenizer, 32, cache)
    assert prepared.rows > 0
    assert any("waiting for host othernode pid 7" in ln for ln in logs), logs
    assert any("taking over" in ln for ln in logs), logs
    assert sorted(os.listdir(cache)) == [key]


def test_live_lock_is_waited_for_not_taken_over(tmp_path, tiny_tokenizer, monkeypatch):
    """A holder that keeps its heartbeat is waited for however long it takes (longer than LOCK_STALE_S here)."""
    _fast_lock(monkeypatch, stale=0.3)
    src, cache = _corpus(tmp_path), tmp_path / "cache"
    cache.mkdir()
    key = cache_key(src, tiny_tokenizer, 32)
    holder = cache_mod.Lock(cache / f".{key}.lock")
    assert holder.try_create()
    done = []
    waiter = threading.Thread(target=lambda: done.append(prepare_corpus(src, tiny_tokenizer, 32, cache)))
    with logged() as logs:
        waiter.start()
        time.sleep(1.2)  # 4x the stale limit: the heartbeat keeps the lock fresh
        assert waiter.is_alive() and not done
        assert not any("taking over" in ln for ln in logs), logs
        assert any("waiting for" in ln and f"pid {os.getpid()}" in ln for ln in logs), logs
        holder.release()
        waiter.join(60)
    assert done and done[0].rows > 0
    assert sorted(os.listdir(cache)) == [key]


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = cache_mod.Lock(tmp_path / ".k.lock")
    assert lock.try_create()
    (tmp_path / ".k.lock").write_text('{"tag": "someone-else"}')  # taken over (wrongly) while we worked
    lock.release()
    assert (tmp_path / ".k.lock").read_text() == '{"tag": "someone-else"}'


# ----------------------------------------------------------------------------- decisions made by the main process
class _Acc:
    """Just what checkpoint.save/load/is_complete_on_main use of an Accelerator, over a real gloo group."""

    def __init__(self, state):
        self.state = state
        self.is_main_process = state.is_main_process
        self.process_index, self.num_processes = state.process_index, state.num_processes
        self.loaded = None

    def wait_for_everyone(self):
        self.state.wait_for_everyone()

    def print(self, *args):
        if self.is_main_process:
            print(*args)

    def save_state(self, path):
        Path(path, f"model_rank{self.process_index}.bin").write_bytes(bytes([self.process_index]) * 1000)
        Path(path, "sub").mkdir(exist_ok=True)
        Path(path, "sub", f"rng_{self.process_index}.pkl").write_bytes(b"r" * (10 + self.process_index))

    def load_state(self, path):
        self.loaded = path


def _rank_worker(rank: int, port: int, out: str, result_path: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    report = {}
    try:
        from accelerate.state import PartialState
        PartialState._reset_state()
        acc = _Acc(PartialState(cpu=True))
        out = Path(out)
        real_files, real_is_complete, real_read_state = checkpoint._files, checkpoint.is_complete, checkpoint.read_state
        if rank == 1:  # this node's (stale NFS) view differs from the main process's
            checkpoint._files = lambda root: real_files(root) + [Path(root) / "phantom.bin"]
            checkpoint.is_complete = lambda path, verify=False: False
            checkpoint.read_state = lambda path: checkpoint.TrainerState(step=999, world_size=2)

        # 1. the manifest: the ranks split the main process's listing
        ckpt = checkpoint.save(acc, out, checkpoint.TrainerState(step=3, world_size=2), keep_last=2)
        report["ckpt"] = str(ckpt)
        # 2. whether `best` is complete: the main process's answer on every rank
        report["best_complete"] = checkpoint.is_complete_on_main(acc, ckpt)
        # 3. the state a load continues from: the main process's reading
        from trainer import reshard
        state = reshard.load(acc, None, None, ckpt, None)
        report["loaded_step"], report["loaded"] = state.step, acc.loaded
        # 4. a rank that cannot read its share: every rank raises the same error (none waits forever)
        checkpoint._files, checkpoint.is_complete, checkpoint.read_state = real_files, real_is_complete, real_read_state
        if rank == 1:
            real_sha = checkpoint._sha256

            def unreadable(path):
                if path.name.startswith("model_rank"):
                    raise FileNotFoundError(2, "No such file or directory", str(path))
                return real_sha(path)

            checkpoint._sha256 = unreadable
        try:
            checkpoint.save(acc, out, checkpoint.TrainerState(step=4, world_size=2), keep_last=2)
            report["unreadable"] = "no error"
        except UserError as exc:
            report["unreadable"] = str(exc)
        acc.wait_for_everyone()
        import torch.distributed as dist
        dist.destroy_process_group()
    except BaseException:
        report["error"] = traceback.format_exc()
    Path(result_path).write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_checkpoint_decisions_come_from_the_main_process(tmp_path):
    ctx = mp.get_context("fork")
    port = _free_port()
    results = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_rank_worker, args=(r, port, str(tmp_path / "run"), str(results[r])))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        if p.is_alive():  # a rank stuck in a collective: the bug this test is about
            p.kill()
    reports = [json.loads(r.read_text()) if r.is_file() else {"error": "no report"} for r in results]
    for r, report in enumerate(reports):
        assert "error" not in report, f"rank {r}: {report['error']}"
    ckpt = Path(reports[0]["ckpt"])
    assert reports[1]["ckpt"] == str(ckpt) and ckpt.name == "step_00000003"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    # exactly the files on disk (the main process's listing), each hashed, the phantom of rank 1's view absent
    assert set(files) == {"model_rank0.bin", "model_rank1.bin", "sub/rng_0.pkl", "sub/rng_1.pkl",
                          "trainer_state.json"}
    assert checkpoint.is_complete(ckpt, verify=True)
    assert [rep["best_complete"] for rep in reports] == [True, True]
    assert [rep["loaded_step"] for rep in reports] == [3, 3]
    assert [rep["loaded"] for rep in reports] == [str(ckpt), str(ckpt)]
    for rep in reports:
        assert "rank 1 cannot read" in rep["unreadable"] and "model_rank" in rep["unreadable"], rep["unreadable"]
    assert not (tmp_path / "run" / "checkpoints" / "step_00000004").exists()  # no manifest, never renamed
