"""Run configuration: YAML + overrides, validated with errors that name the full key."""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from trainer.config import FinetuneConfig, CHOICES, CorpusSource, PretrainConfig, _LIST_ITEM_TYPES, describe, load
from trainer.errors import UserError


def _write(tmp_path, text: str, name: str = "run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_without_file_or_overrides():
    cfg = load(PretrainConfig, None, [])
    assert cfg == PretrainConfig()


def test_yaml_load(tmp_path):
    path = _write(tmp_path, """
output_dir: runs/x
seed: 7
model:
  config: {model_type: bert, hidden_size: 64}
data:
  corpora:
    - path: a.txt
      doc_separator: blank
    - path: [b.jsonl, c.jsonl]
      weight: 2
  seq_len: 64
optim:
  lr: 0.001
  scheduler: cosine
""")
    cfg = load(PretrainConfig, path, [])
    assert cfg.output_dir == "runs/x" and cfg.seed == 7
    assert cfg.model.config == {"model_type": "bert", "hidden_size": 64}
    assert [type(c) for c in cfg.data.corpora] == [CorpusSource, CorpusSource]
    assert cfg.data.corpora[0].path == "a.txt" and cfg.data.corpora[0].doc_separator == "blank"
    assert cfg.data.corpora[1].path == ["b.jsonl", "c.jsonl"] and cfg.data.corpora[1].weight == 2
    assert cfg.data.corpora[1].text_field == "text"  # default kept
    assert cfg.data.seq_len == 64
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.scheduler == "cosine"
    assert cfg.train == PretrainConfig().train  # untouched section keeps defaults


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load(PretrainConfig, _write(tmp_path, ""), []) == PretrainConfig()


def test_overrides(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 0.001\n  weight_decay: 0.1\n")
    cfg = load(PretrainConfig, path, ["optim.lr=1e-4", "train.max_steps=20", "wandb.tags=[a,b]",
                                      "model.config.hidden_size=32", "wandb.name=my run", "data.nsp=true",
                                      "optim.betas=[0.9, 0.98]"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == pytest.approx(0.1)  # sibling from the file kept
    assert cfg.train.max_steps == 20
    assert cfg.wandb.tags == ["a", "b"]
    assert cfg.model.config == {"hidden_size": 32}  # nested into a dict-typed field
    assert cfg.wandb.name == "my run"
    assert cfg.data.nsp is True
    assert cfg.optim.betas == [0.9, 0.98]


def test_override_value_may_contain_equals_sign():
    cfg = load(PretrainConfig, None, ["wandb.name=a=b"])
    assert cfg.wandb.name == "a=b"


def test_later_override_wins():
    cfg = load(PretrainConfig, None, ["seed=1", "seed=2"])
    assert cfg.seed == 2


def test_override_without_equals_sign():
    with pytest.raises(UserError, match="optim.lr"):
        load(PretrainConfig, None, ["optim.lr"])


def test_override_through_a_scalar_is_refused():
    with pytest.raises(UserError, match="seed"):
        load(PretrainConfig, None, ["seed.x=1"])


@pytest.mark.parametrize("text", ["5e-5", "1E-4", "3e2"])
def test_string_float_coercion(tmp_path, text):
    # PyYAML reads exponent floats without a dot as strings
    cfg = load(PretrainConfig, _write(tmp_path, f"optim:\n  lr: {text}\n"), [])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == float(text)
    cfg = load(PretrainConfig, None, [f"optim.lr={text}"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == float(text)


def test_unknown_key_named_in_full(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'optim\.lrr'"):
        load(PretrainConfig, None, ["optim.lrr=1e-4"])
    with pytest.raises(UserError, match=r"unknown config key 'optim\.warmup'"):
        load(PretrainConfig, None, ["optim.warmup.steps=3"])  # 'warmup' is no key of optim
    with pytest.raises(UserError, match=r"unknown config key 'bogus'"):
        load(PretrainConfig, _write(tmp_path, "bogus: 1\n"), [])


def test_unknown_key_inside_nested_section(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'model\.hidden'"):
        load(PretrainConfig, _write(tmp_path, "model:\n  hidden: 3\n"), [])


def test_unknown_key_inside_corpus_list(tmp_path):
    path = _write(tmp_path, "data:\n  corpora:\n    - path: a.txt\n    - path: b.txt\n      textfield: body\n")
    with pytest.raises(UserError, match=r"unknown config key 'data\.corpora\[1\]\.textfield'"):
        load(PretrainConfig, path, [])


def test_corpus_item_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match=r"data\.corpora\[0\]"):
        load(PretrainConfig, _write(tmp_path, "data:\n  corpora: [a.txt]\n"), [])


@pytest.mark.parametrize("override,key", [
    ("optim.lr=fast", "optim.lr"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.max_steps=true", "train.max_steps"),  # bool is not an int here
    ("data.seq_len=[1]", "data.seq_len"),
    ("wandb.tags=a", "wandb.tags"),
    ("optim.lr=true", "optim.lr"),
    ("data.corpora=x.txt", "data.corpora"),
    ("data.max_predictions=many", "data.max_predictions"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(UserError, match=rf"config key '{re.escape(key)}' must be"):
        load(PretrainConfig, None, [override])


def test_wrong_type_inside_corpus_list(tmp_path):
    path = _write(tmp_path, "data:\n  corpora:\n    - path: a.txt\n      weight: heavy\n")
    with pytest.raises(UserError, match=r"config key 'data\.corpora\[0\]\.weight' must be float"):
        load(PretrainConfig, path, [])


def test_section_must_be_mapping():
    with pytest.raises(UserError, match=r"config key 'optim' must be a mapping"):
        load(PretrainConfig, None, ["optim=3"])


def test_optional_accepts_null():
    cfg = load(PretrainConfig, None, ["data.max_predictions=20"])
    assert cfg.data.max_predictions == 20
    cfg = load(PretrainConfig, None, ["data.max_predictions=null"])
    assert cfg.data.max_predictions is None


@pytest.mark.parametrize("override,key", [
    ("optim.scheduler=bogus", "optim.scheduler"),
    ("model.precision=fp8", "model.precision"),
    ("wandb.mode=maybe", "wandb.mode"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
])
def test_choices(override, key):
    with pytest.raises(UserError, match=rf"config key '{re.escape(key)}' must be one of"):
        load(PretrainConfig, None, [override])


def _schema_for(key: str):
    """The run schema a CHOICES key belongs to (pre-training, or fine-tuning for the classification keys)."""
    lines = {ln.split("=")[0].strip() for ln in describe(PretrainConfig)}
    return PretrainConfig if key in lines else FinetuneConfig


def test_choices_every_allowed_value_accepted():
    for key, allowed in CHOICES.items():
        if key.startswith("data.corpora."):
            continue
        for value in allowed:
            cfg = load(_schema_for(key), None, [f"{key}={value}"])
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value


def test_choices_inside_corpus_list(tmp_path):
    path = _write(tmp_path, "data:\n  corpora:\n    - path: a.txt\n    - path: b.txt\n      format: xml\n")
    with pytest.raises(UserError, match=r"config key 'data\.corpora\[1\]\.format' must be one of"):
        load(PretrainConfig, path, [])
    path = _write(tmp_path, "data:\n  corpora:\n    - path: a.txt\n      doc_separator: para\n", "b.yaml")
    with pytest.raises(UserError, match=r"data\.corpora\[0\]\.doc_separator"):
        load(PretrainConfig, path, [])


def test_bad_yaml_file(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load(PretrainConfig, path, [])


def test_yaml_top_level_not_mapping(tmp_path):
    with pytest.raises(UserError, match="mapping"):
        load(PretrainConfig, _write(tmp_path, "- a\n- b\n"), [])


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not found") as exc:
        load(PretrainConfig, missing, [])
    assert missing in str(exc.value)


def test_repo_configs_load():
    from conftest import repo_root
    files = sorted((repo_root() / "configs" / "pretrain").glob("*.yaml"))
    assert files
    for f in files:
        load(PretrainConfig, str(f), [])


# ----------------------------------------------------------------------------- describe (the --help body)
def _all_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _all_keys(tp, prefix + f.name + ".")
            continue
        out.append(prefix + f.name)
        item = _LIST_ITEM_TYPES.get((cls, f.name))
        if item is not None:
            out += _all_keys(item, f"{prefix}{f.name}[i].")
    return out


def test_describe_covers_every_key():
    lines = describe(PretrainConfig)
    described = [ln.split("=")[0].strip() for ln in lines]
    keys = _all_keys(PretrainConfig)
    assert "data.corpora[i].text_field" in keys and "optim.lr" in keys  # the walker itself is sane
    assert sorted(described) == sorted(keys)
    # every line shows the default
    defaults = PretrainConfig()
    assert any(ln.strip().startswith("optim.lr = ") and repr(defaults.optim.lr) in ln for ln in lines)
    assert any(ln.strip().startswith("data.seq_len = ") and repr(defaults.data.seq_len) in ln for ln in lines)


def test_describe_lists_top_level_choices():
    for key, allowed in CHOICES.items():
        if key.startswith("data.corpora."):
            continue
        lines = {ln.split("=")[0].strip(): ln for ln in describe(_schema_for(key))}
        assert "one of: " + ", ".join(allowed) in lines[key], key
    # a task's keys inside a list show the same choices as the top-level ones
    lines = {ln.split("=")[0].strip(): ln for ln in describe(FinetuneConfig)}
    assert "one of: head, tail, head_tail, hierarchical" in lines["tasks[i].text.strategy"]


def test_describe_lists_corpus_choices():
    lines = {ln.split("=")[0].strip(): ln for ln in describe(PretrainConfig)}
    for key, allowed in CHOICES.items():
        if key.startswith("data.corpora."):
            shown = key.replace("data.corpora.", "data.corpora[i].")
            assert "one of: " + ", ".join(allowed) in lines[shown], key
