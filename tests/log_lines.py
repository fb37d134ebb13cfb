"""The messages `trainer` loggers write during a block: what a user would read in the job log, for tests to check."""
from __future__ import annotations

import logging
from contextlib import contextmanager


class _Collect(logging.Handler):
    def __init__(self, lines: list):
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def logged(name: str = "trainer", level: int = logging.INFO):
    """`with logged() as lines:` — lines gets each message of `name` and its children at `level` and up."""
    lines: list = []
    logger, handler = logging.getLogger(name), _Collect(lines)
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
