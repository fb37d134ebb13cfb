"""Every config key an error message names exists in the schema.

An error that tells the user to "set model.unpadded=false" when no such key exists sends them from one error to
the next. This reads every `UserError(...)` in trainer/ (the literal parts of its message, f-strings included)
and resolves each dotted name that starts with a config section against the dataclasses of trainer/config.py."""
from __future__ import annotations

import ast
import dataclasses
import re
import typing
from pathlib import Path

from trainer import config as C

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = (C.PretrainConfig, C.FinetuneConfig, C.RecipeConfig, C.GridConfig)
# a dotted name: section.key[.key…], list indexes like [0] or [i] allowed after a part
DOTTED = re.compile(r"(?<![\w./-])([a-z_]+(?:\[[^\]]*\])?(?:\.[a-z_][a-z0-9_]*(?:\[[^\]]*\])?)+)(?![\w(/-])")
FILE_SUFFIXES = ("json", "jsonl", "yaml", "safetensors", "txt", "py", "md", "png", "bin", "gz", "csv", "tsv",
                 "parquet", "lock", "tmp", "sbatch")


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _resolves(parts: list[str], cls) -> bool:
    """Walk `parts` down the schema from `cls`; a free-form dict (model.config, overrides) takes any key below."""
    for i, part in enumerate(parts):
        fields = _fields(cls)
        if part not in fields:
            return False
        tp = fields[part]
        item = C._LIST_ITEM_TYPES.get((cls, part))
        if item is not None:
            cls = item
        elif dataclasses.is_dataclass(tp):
            cls = tp
        else:
            origin = typing.get_origin(tp)
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            free = tp is dict or origin is dict or dict in args or any(typing.get_origin(a) is dict for a in args)
            return free or i == len(parts) - 1
    return True


def _section_names() -> set[str]:
    return {name for cls in RUN_CONFIGS for name in _fields(cls)}


def _message_literals(call: ast.Call) -> list[str]:
    """The literal text of the message, with every formatted value replaced by a marker that ends a name."""
    out = []
    for arg in call.args[:1]:
        for node in ast.walk(arg):
            if isinstance(node, ast.JoinedStr):
                out.append("".join(v.value if isinstance(v, ast.Constant) else "\x00" for v in node.values))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


def named_keys() -> list[tuple[str, int, str]]:
    sections = _section_names()
    found = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError"):
                continue
            for text in _message_literals(node):
                for m in DOTTED.finditer(text):
                    name = m.group(1)
                    end = m.end()
                    if end < len(text) and text[end] == "\x00" or text[end - 1:end] == ".":
                        continue  # the key is completed at run time (f"train.{key}")
                    parts = [re.sub(r"\[[^\]]*\]$", "", p) for p in name.split(".")]
                    if parts[0] in sections and parts[-1] not in FILE_SUFFIXES:
                        found.append((str(path.relative_to(REPO)), node.lineno, name))
    return found


def test_error_messages_name_real_keys():
    keys = named_keys()
    assert len(keys) > 30  # the scan sees the messages (it is not vacuous)
    bad = [(f, line, name) for f, line, name in keys
           if not any(_resolves([re.sub(r"\[[^\]]*\]$", "", p) for p in name.split(".")], cls) for cls in RUN_CONFIGS)]
    assert not bad, "error messages name keys the schema does not have: " + "; ".join(
        f"{f}:{line} {name}" for f, line, name in bad)


def test_resolver_rejects_a_missing_key():
    assert not _resolves(["model", "unpadded"], C.FinetuneConfig)
    assert _resolves(["model", "attn_implementation"], C.FinetuneConfig)
    assert _resolves(["model", "config", "attention_probs_dropout_prob"], C.FinetuneConfig)
    assert _resolves(["data", "corpora", "weight"], C.PretrainConfig)
    assert _resolves(["tasks", "text", "strategy"], C.FinetuneConfig)
