"""What `accelerate launch` was told, what the model checkpoint is, and what the run config says must agree:
honoured, or refused in one line — never silently dropped (issue 9, items 1, 7, 8)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import repo_root
import log_lines
from trainer.config import FinetuneConfig, ModelConfig, build
from trainer.distributed import _deepspeed_dict, resolve_launch_settings
from trainer.errors import UserError


@pytest.fixture
def logged():
    """The job log's messages (tests/log_lines.py) while the test runs."""
    with log_lines.logged() as lines:
        yield lines


LAUNCHER_VARS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                 "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")


@pytest.fixture
def launcher(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _cfg(**sections):
    return build(FinetuneConfig, sections)


def test_defaults_without_launcher_settings(launcher):
    cfg = resolve_launch_settings(_cfg())
    assert (cfg.model.precision, cfg.train.grad_accum, cfg.train.max_grad_norm) == ("fp32", 1, 1.0)


def test_launcher_settings_are_adopted_and_logged(launcher, logged):
    launcher.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    launcher.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    launcher.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    cfg = resolve_launch_settings(_cfg())
    assert (cfg.model.precision, cfg.train.grad_accum, cfg.train.max_grad_norm) == ("bf16", 4, 0.5)
    assert len(logged) == 3 and "mixed_precision" in logged[0]
    logged.clear()
    assert resolve_launch_settings(_cfg(), quiet=True) == cfg and logged == []  # recomputed for a check


def test_accelerate_default_no_is_not_a_contradiction(launcher):
    launcher.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch sets when nothing was asked
    assert resolve_launch_settings(_cfg(model={"precision": "bf16"})).model.precision == "bf16"


@pytest.mark.parametrize("var,value,section", [
    ("ACCELERATE_MIXED_PRECISION", "bf16", {"model": {"precision": "fp32"}}),
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", {"train": {"grad_accum": 2}}),
    ("ACCELERATE_GRADIENT_CLIPPING", "0.5", {"train": {"max_grad_norm": 1.0}}),
])
def test_contradiction_is_refused_in_one_line(launcher, var, value, section):
    launcher.setenv(var, value)
    with pytest.raises(UserError, match="contradicts") as err:
        resolve_launch_settings(_cfg(**section))
    assert "\n" not in str(err.value)


def test_agreeing_settings_pass(launcher):
    launcher.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    assert resolve_launch_settings(_cfg(train={"grad_accum": 2})).train.grad_accum == 2


def test_deepspeed_without_json_takes_stage_and_offload_from_accelerate(launcher):
    launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    launcher.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    launcher.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    assert _deepspeed_dict(None) == {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}


def test_json_contradicted_by_accelerate_zero_settings_is_refused(launcher):
    launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(UserError, match="stage=2 contradicts"):
        _deepspeed_dict(str(repo_root() / "ds_configs" / "zero3.json"))
    launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    launcher.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    with pytest.raises(UserError, match="offload_param=cpu contradicts"):
        _deepspeed_dict(str(repo_root() / "ds_configs" / "zero3.json"))
    assert _deepspeed_dict(str(repo_root() / "ds_configs" / "zero3_offload.json"))["zero_optimization"]["stage"] == 3


def test_every_stage_of_one_process_keeps_the_launched_deepspeed_json():
    """The recipe builds one Accelerator per stage in the same process: each must run the launched JSON (ZeRO-3
    here), not fall back to a bare ZeRO-2 after the first."""
    script = (
        "import os, torch\n"
        "from trainer.distributed import make_accelerator, reset_between_stages, shutdown\n"
        "stages = []\n"
        "for _ in range(2):\n"
        "    acc, topo = make_accelerator(precision='fp32', micro_batch=2, grad_accum=1, max_grad_norm=1.0,\n"
        "                                 deepspeed_config=None)\n"
        "    from transformers import BertConfig, BertModel\n"
        "    net = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,\n"
        "                               intermediate_size=8))\n"
        "    model, _ = acc.prepare(net, torch.optim.AdamW(net.parameters()))\n"
        "    stages.append((topo.zero_stage, model.zero_optimization_stage()))\n"
        "    reset_between_stages()\n"
        "print(stages)\n"
        "shutdown()\n")
    env = {**__import__("os").environ, "ACCELERATE_USE_DEEPSPEED": "true", "MASTER_PORT": "29533",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(repo_root() / "ds_configs" / "zero3.json")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo_root(), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[(3, 3), (3, 3)]"


def test_fp16_without_gpu_is_refused():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from trainer.distributed import make_accelerator
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        make_accelerator(precision="fp16", micro_batch=1, grad_accum=1, max_grad_norm=1.0, deepspeed_config=None)


# ----------------------------------------------------------------------------- model checkpoint vs run config
@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    """A tiny 'pretrained' BERT saved with its own tokenizer, and a second, different tokenizer."""
    from transformers import BertConfig, BertForMaskedLM
    from trainer.data.builtin import builtin_tokenizer_dir
    cache = tmp_path_factory.mktemp("tok")
    own = builtin_tokenizer_dir(cache, "grammar", 600)
    other = builtin_tokenizer_dir(cache, "grammar", 300)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(own)
    path = tmp_path_factory.mktemp("pre") / "bert"
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    tok.save_pretrained(path)
    bare = tmp_path_factory.mktemp("bare") / "bert"  # weights only, no tokenizer files
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(bare)
    return path, bare, own, other


def test_foreign_tokenizer_refused_unless_opted_in(saved_bert):
    from trainer.model import load_tokenizer
    path, bare, own, other = saved_bert
    assert load_tokenizer(ModelConfig(name_or_path=str(path)))  # its own
    assert load_tokenizer(ModelConfig(name_or_path=str(path), tokenizer=str(own)))  # same vocabulary elsewhere
    with pytest.raises(UserError, match="is not the vocabulary .*tokenizer_mismatch_ok=true"):
        load_tokenizer(ModelConfig(name_or_path=str(path), tokenizer=str(other)))
    with pytest.raises(UserError, match="is not the vocabulary"):  # no tokenizer shipped: vocab size decides
        load_tokenizer(ModelConfig(name_or_path=str(bare), tokenizer=str(other)))
    assert load_tokenizer(ModelConfig(name_or_path=str(bare), tokenizer=str(own)))
    assert load_tokenizer(ModelConfig(name_or_path=str(path), tokenizer=str(other), tokenizer_mismatch_ok=True))


def test_model_config_overrides_a_pretrained_config_or_is_refused(saved_bert):
    from transformers import AutoTokenizer
    from trainer.model import build_model
    path = str(saved_bert[0])
    tok = AutoTokenizer.from_pretrained(path)
    model = build_model(ModelConfig(name_or_path=path, config={"hidden_dropout_prob": 0.0}), tok)
    assert model.config.hidden_dropout_prob == 0.0
    assert {p.dtype for p in model.parameters()} == {__import__("torch").float32}
    with pytest.raises(UserError, match="no such key"):
        build_model(ModelConfig(name_or_path=path, config={"hidden_dropout": 0.0}), tok)
    with pytest.raises(UserError, match="would not fit"):
        build_model(ModelConfig(name_or_path=path, config={"hidden_size": 64}), tok)


def test_attention_auto_falls_back_to_eager_with_a_line_explicit_sdpa_is_refused(logged):
    from trainer.model import instantiate

    def deberta(attn):
        from transformers import DebertaV2Config, DebertaV2Model
        return DebertaV2Model(DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32,
                                              attn_implementation=attn))

    model = instantiate(deberta, ModelConfig(attn_implementation="auto"), "deberta-v2")
    assert model.config._attn_implementation == "eager"
    assert any("using eager" in line for line in logged)
    with pytest.raises(UserError, match="cannot load deberta-v2"):
        instantiate(deberta, ModelConfig(attn_implementation="sdpa"), "deberta-v2")



def test_mixed_precision_flag_of_accelerate_launch_is_what_runs(tmp_path):
    """`accelerate launch --mixed_precision bf16` with a run config that leaves precision at auto: the engine
    runs bf16 (read back from it), and an explicit fp32 in the run config is refused in one line."""
    from launching import error_lines, metrics, run
    out = tmp_path / "run"
    run("cpu_zero2", out, "train.max_steps=2", "train.log_every=1", cache=tmp_path / "cache",
        launcher_args=["--mixed_precision", "bf16"])
    assert {r["precision"] for r in metrics(out)} == {"bf16"}
    proc = run("cpu_zero2", tmp_path / "refused", "model.precision=fp32", cache=tmp_path / "cache", check=False,
               launcher_args=["--mixed_precision", "bf16"])
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == ["error: accelerate's mixed_precision=bf16 contradicts model.precision=fp32; "
                                        "make them agree or remove one"]
