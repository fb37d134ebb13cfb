"""Shared fixtures for the single-process unit tests.

Nothing here downloads anything: the tokenizer is the project's builtin WordPiece trained on the builtin grammar
corpus, and every cache (corpus shards, tokenizer) lives under pytest's tmp dirs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    return repo_root().parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Point the corpus cache (and any HF lookups) away from ~/.cache for the whole session."""
    cache = tmp_path_factory.mktemp("bert-recipe-cache")
    saved = {k: os.environ.get(k) for k in ("BERT_RECIPE_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ["BERT_RECIPE_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    yield cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from trainer.data.builtin import builtin_tokenizer_dir
    return builtin_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"), "grammar", 1000)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture
def corpus_cache(tmp_path) -> Path:
    path = tmp_path / "corpus-cache"
    path.mkdir()
    return path


_SLOW = {line.strip() for line in (Path(__file__).parent / "slow.txt").read_text().splitlines()
         if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
    """Mark the measured-slow tests (tests/slow.txt: real multi-rank runs, end-to-end stages) `slow`, and every
    test of tests/test_matrix.py; `-m "not slow"` is the fast lane."""
    for item in items:
        if item.nodeid in _SLOW or item.nodeid.startswith("tests/test_matrix.py"):
            item.add_marker(pytest.mark.slow)
