"""The job log: time, level and rank on every line; the main process writes, other ranks only warnings and
errors unless every rank is asked to; the level is a setting; a wrong level is one error naming the key."""
from __future__ import annotations

import logging
import re

import pytest

from trainer import logs
from trainer.errors import UserError

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|DEBUG|ERROR) +\[rank (\d+)\] stages\.x: (.*)$")


def _lines(capsys) -> list:
    return [LINE.match(ln).groups() for ln in capsys.readouterr().out.splitlines()]


@pytest.fixture(autouse=True)
def _reset():
    yield
    logs.setup("info", False)


def test_main_process_writes_with_time_level_and_rank(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    logs.setup("info")
    log = logging.getLogger("trainer.stages.x")
    log.debug("not shown at info")
    log.info("hello")
    log.warning("careful")
    assert _lines(capsys) == [("INFO", "0", "hello"), ("WARNING", "0", "careful")]


def test_other_ranks_write_warnings_only_unless_all_ranks(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    logs.setup("info")
    log = logging.getLogger("trainer.stages.x")
    log.info("rank 3 info")
    log.error("rank 3 failed")
    assert _lines(capsys) == [("ERROR", "3", "rank 3 failed")]
    logs.setup("debug", all_ranks=True)
    log.debug("every rank")
    assert _lines(capsys) == [("DEBUG", "3", "every rank")]


def test_one_handler_whatever_the_number_of_setups(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    for _ in range(3):
        logs.setup("info")
    logging.getLogger("trainer.stages.x").info("once")
    assert _lines(capsys) == [("INFO", "0", "once")]


def test_level_from_the_command_line_and_config(tmp_path, capsys, monkeypatch):
    from trainer.cli import parse_args
    from trainer.config import FinetuneConfig
    monkeypatch.setenv("RANK", "0")
    _, cfg = parse_args(FinetuneConfig, "doc", ["--log-level", "warning"])
    assert cfg.log.level == "warning"
    logging.getLogger("trainer.stages.x").info("hidden")
    assert _lines(capsys) == []
    _, cfg = parse_args(FinetuneConfig, "doc", ["log.level=debug", "--log-all-ranks"])
    assert cfg.log.level == "debug" and cfg.log.all_ranks
    with pytest.raises(UserError, match="log.level"):
        parse_args(FinetuneConfig, "doc", ["log.level=loud"])
