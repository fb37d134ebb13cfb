"""Head warm-up before further pre-training (issue 11, item 4): a checkpoint without MLM-head weights first
trains the new head with the encoder frozen — through lr 0, so it holds under ZeRO-3 — then everything trains.

The encoder (tied word embeddings included) must be bit-identical to the checkpoint during the warm-up while the
head's own weights change, and it must move once the warm-up ends; a checkpoint with its head gets no warm-up."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launching import metrics, run
from trainer.errors import UserError

ENCODER_PROBES = ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
                  "bert.encoder.layer.1.output.dense.weight")
HEAD_OWN = ("cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.weight")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, _isolated_cache):
    """A tiny BERT saved twice with the builtin tokenizer: as a bare `BertModel` (no MLM head, like a sentence
    encoder) and as `BertForMaskedLM` (with its head). The session's cache: tokenizer and corpus made once."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel
    from trainer.data.builtin import builtin_tokenizer_dir
    cache = _isolated_cache
    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir(cache, "grammar", 1000))
    conf = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for cls, name in ((BertModel, "no_head"), (BertForMaskedLM, "with_head")):
        cls(conf).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "no_head", root / "with_head", cache


def _initial_encoder(no_head: Path) -> dict:
    from safetensors.torch import load_file
    return {f"bert.{k}": v for k, v in load_file(str(no_head / "model.safetensors")).items()
            if not k.startswith("pooler.")}  # masked-LM models drop the pooler


def _pretrain(setup, out, no_head, cache, *overrides):
    return run(setup, out, f"model.name_or_path={no_head}", "model.config=null", "model.tokenizer=null",
               "optim.scheduler=constant", "optim.warmup_ratio=0", "train.save_every=1", "train.keep_last=10",
               "train.log_every=1", "train.head_warmup_lr=3e-3", *overrides, cache=cache, timeout=300)


def _step_dirs(out: Path) -> dict:
    return {int(p.name.split("_")[1]): p for p in (out / "checkpoints").glob("step_*")}


def _check_warmup(states: dict, initial: dict, warmup: int) -> None:
    """states: {step: full fp32 state dict after that step}."""
    for step in range(1, warmup + 1):
        for name, value in initial.items():  # every encoder weight, word embeddings included: bit-identical
            assert torch.equal(states[step][name], value), (step, name)
        decoder = states[step].get("cls.predictions.decoder.weight")
        if decoder is not None:  # tied to the word embeddings: frozen with them
            assert torch.equal(decoder, initial["bert.embeddings.word_embeddings.weight"])
    for step in range(2, warmup + 1):  # the head's own weights train during the warm-up, at every step
        for name in HEAD_OWN:
            assert not torch.equal(states[step][name], states[step - 1][name]), (step, name)
    after = states[warmup + 1]
    for name in ENCODER_PROBES:  # the first step after the warm-up moves the encoder
        assert not torch.equal(after[name], initial[name]), name


def _check_logged_lrs(out: Path, warmup: int) -> None:
    """Warm-up: the head at train.head_warmup_lr, the encoder at 0; then every group at optim.lr (constant
    schedule here), the schedule starting with the encoder."""
    import yaml
    run_cfg = yaml.safe_load((out / "config.yaml").read_text())
    head_lr, lr = run_cfg["train"]["head_warmup_lr"], run_cfg["optim"]["lr"]
    assert head_lr != lr
    groups = json.loads((out / "param_groups.json").read_text())
    head = [g.get("task") == "head" for g in groups]
    assert any(head) and not all(head)
    for g, is_head in zip(groups, head):
        assert all(n.startswith("cls.") for n in g["names"]) == is_head, g["names"]
    assert "bert.embeddings.word_embeddings.weight" in [n for g, h in zip(groups, head) if not h for n in g["names"]]
    for line in metrics(out):  # the lr logged at step k is the one in effect for step k + 1
        frozen = line["step"] < warmup
        for got, is_head in zip(line["lr"], head):
            want = (head_lr if is_head else 0.0) if frozen else lr
            assert got == pytest.approx(want, rel=1e-6), (line["step"], line["lr"])


def test_auto_warmup_single_process(checkpoints, tmp_path):
    """No MLM head in the checkpoint → auto warm-up of min(100, half of 6) = 3 steps, then the encoder trains."""
    from safetensors.torch import load_file
    no_head, _, cache = checkpoints
    out = tmp_path / "pt"
    proc = _pretrain(None, out, no_head, cache, "train.max_steps=6", "train.stop_at_step=4",
                     "train.micro_batch_size=8")
    assert "head warm-up: steps 1–3 train the pre-training head only at lr 0.003 (auto:" in proc.stdout
    assert "head warm-up done after step 3: the encoder trains from step 4 on, optim's schedule" in proc.stdout
    steps = _step_dirs(out)
    assert sorted(steps) == [1, 2, 3, 4]
    states = {k: load_file(str(d / "model.safetensors")) for k, d in steps.items()}
    _check_warmup(states, _initial_encoder(no_head), warmup=3)
    _check_logged_lrs(out, warmup=3)
    assert not (out / "curves.png").exists()  # stopped, not finished: no figure yet


def test_warmup_under_zero3_two_ranks(checkpoints, tmp_path):
    """The same freezing under ZeRO-3 with 2 ranks: requires_grad never changes, the lr does."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    no_head, _, cache = checkpoints
    out = tmp_path / "z3"
    proc = _pretrain("cpu_zero3", out, no_head, cache, "train.max_steps=3", "train.head_warmup_steps=2",
                     "train.micro_batch_size=4")
    assert ("head warm-up: steps 1–2 train the pre-training head only at lr 0.003 (train.head_warmup_steps=2)"
            in proc.stdout)
    assert proc.stdout.count("head warm-up done after step 2") == 1  # main process only
    states = {k: get_fp32_state_dict_from_zero_checkpoint(str(d), tag="pytorch_model")
              for k, d in _step_dirs(out).items()}
    assert sorted(states) == [1, 2, 3]
    _check_warmup(states, _initial_encoder(no_head), warmup=2)
    _check_logged_lrs(out, warmup=2)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a finished run draws its curves


def test_auto_warmup_only_without_head_weights(checkpoints):
    from transformers import AutoTokenizer
    from trainer.config import ModelConfig
    from trainer.model import build_model, head_parameter_names, missing_head_weights
    from trainer.stages.pretrain import head_warmup_steps
    no_head, with_head, _ = checkpoints
    tok = AutoTokenizer.from_pretrained(str(with_head))
    info: dict = {}
    model = build_model(ModelConfig(name_or_path=str(with_head)), tok, loading_info=info)
    assert missing_head_weights(model, info) == [] and head_warmup_steps(-1, [], 300) == 0  # has its head: none
    model = build_model(ModelConfig(name_or_path=str(no_head)), tok, loading_info=info)
    missing = missing_head_weights(model, info)
    assert "cls.predictions.transform.dense.weight" in missing and not any(m.startswith("bert.") for m in missing)
    head = head_parameter_names(model)
    assert head and all(n.startswith("cls.") for n in head)  # the tied decoder matrix is the encoder's
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    # auto: 10 % of the run, at least 100 steps (at most half the run), at most 1000
    assert [head_warmup_steps(-1, missing, n) for n in (6, 30, 500, 5000, 10**6)] == [3, 15, 100, 500, 1000]
    assert (head_warmup_steps(0, missing, 30), head_warmup_steps(5, [], 30)) == (0, 5)  # explicit wins
    random_init = build_model(ModelConfig(config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 64}),
                              tok, loading_info=info)
    assert missing_head_weights(random_init, info) == []  # nothing loaded, nothing to protect


def test_bad_warmup_setting_is_refused():
    from trainer.config import PretrainConfig, build
    from trainer.stages.pretrain import validate
    cfg = build(PretrainConfig, {"data": {"corpora": [{"path": "builtin:grammar"}]},
                                 "train": {"head_warmup_steps": -2, "grad_accum": 1}})
    with pytest.raises(UserError, match="train.head_warmup_steps"):
        validate(cfg)
