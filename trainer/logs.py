"""The job log: the standard `logging` module, rank-aware, with timestamps and levels.

Every module logs through `logging.getLogger(__name__)` (all names under `trainer`); an entry point calls
`setup()` once. On a cluster the job log is all a user has, so each line carries time, level and rank:

    2026-12-05 17:20:01 INFO    [rank 0] stages.finetune: task: train 4500 · dev 500 · labels [...]

Only the main process (global rank 0) writes by default — a 64-rank job would otherwise repeat every line 64
times; `log.all_ranks: true` (or `--log-all-ranks`) lets every rank write. Errors and warnings of other ranks are
written whatever the setting: a rank that alone fails must be heard. The rank is read from the launcher's
environment (`RANK`), not from a process group, so lines logged before the process group forms (config,
data preparation) are attributed and filtered the same way. That is also why this is not accelerate's
`get_logger`: it refuses to log before an `Accelerator`/`PartialState` exists, and data preparation and config
checks log before one does.

The records go to stdout — the stream a scheduler writes to the job's log file — one stream so that their order
is kept; `error: …` lines of bad input stay on stderr (trainer/errors.py) and tqdm's progress bar is drawn there.
"""
from __future__ import annotations

import logging
import os
import sys

ROOT = "trainer"
LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)-7s [rank %(rank)s] %(short)s: %(message)s"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    """Adds the rank and a short logger name to each record; off the main process, passes only WARNING and up
    unless every rank is to write."""

    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        record.short = record.name.removeprefix(ROOT + ".")
        return self.all_ranks or record.rank == 0 or record.levelno >= logging.WARNING


class _Stdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time of the record (a test's capture, a redirected stream)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup(level: str = "info", all_ranks: bool = False) -> logging.Logger:
    """Install the one handler of the `trainer` loggers (again on a second call: the last settings win)."""
    if level.lower() not in LEVELS:
        from .errors import UserError
        raise UserError(f"log.level must be one of {', '.join(LEVELS)}; got {level!r}")
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if getattr(handler, "_trainer", False):
            logger.removeHandler(handler)
    handler = _Stdout()
    handler._trainer = True
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_RankFilter(all_ranks))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False  # one line per record, whatever the root logger of a host program does
    return logger
