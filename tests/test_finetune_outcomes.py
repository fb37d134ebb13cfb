"""What fine-tuning produces, checked on real 2-rank `accelerate launch` runs:
- the exported model differs from the start in every encoder tensor and in the head (by a plausible amount);
- a ZeRO-2 run moved from 1 rank to 2 at a checkpoint repeats the uninterrupted 2-rank run (no dropout);
- hierarchical chunk pooling under ZeRO-3 learns (test accuracy far above chance);
- launch/predict.py's probabilities are the exported model's own softmax(logits)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_data import save_tiny_bert
from launching import REPO, env, metrics, run

LR, LAYERS, STEPS, STOP = 1e-3, 4, 8, 4
FT = dict(script="finetune.py", config="configs/finetune/tiny.yaml")
NO_DROPOUT = ("model.config.hidden_dropout_prob=0", "model.config.attention_probs_dropout_prob=0", "head.dropout=0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, cache):
    """A tiny BERT saved to disk, so the weights before fine-tuning are known exactly."""
    return save_tiny_bert(tmp_path_factory.mktemp("start") / "bert", cache, LAYERS)


def common(start_model: Path) -> list[str]:
    return [f"model.name_or_path={start_model}", *NO_DROPOUT, f"train.max_steps={STEPS}", "train.micro_batch_size=16",
            "train.log_every=1", "train.eval_every=100", "train.trace_samples=true", f"optim.lr={LR}",
            "optim.layer_decay=0.7", "optim.scheduler=cosine", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache, start_model) -> Path:
    """Uninterrupted 2-rank ZeRO-2 fine-tune from `start_model` (global batch 32)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run("cpu_zero2", out, *common(start_model), cache=cache, **FT)
    return out


@pytest.fixture(scope="module")
def hierarchical(tmp_path_factory, cache) -> Path:
    """ZeRO-3, 2 ranks, builtin:topics as documents of up to 6 chunks of 32 pieces, mean-pooled (as in
    configs/finetune/tiny_multitask.yaml). 60 steps at lr 3e-3 reached 0.85 / 1.0 test accuracy (seeds 42 / 7);
    at 40 steps and lr 1e-3 it is a coin toss, hence these settings."""
    out = tmp_path_factory.mktemp("hier") / "run"
    run("cpu_zero3", out, "text.strategy=hierarchical", "text.max_len=32", "text.max_chunks=6", "text.chunk_pool=mean",
        "train.max_steps=60", "train.eval_every=1000", "train.log_every=10", "optim.lr=3e-3", cache=cache,
        timeout=400, **FT)
    return out


@pytest.fixture(scope="module")
def standard(tmp_path_factory, cache) -> Path:
    """One plain process, the standard head (exported in HF format), trained long enough that its outputs depend
    on the input (8 steps from a random encoder give near-constant probabilities)."""
    out = tmp_path_factory.mktemp("standard") / "run"
    run(None, out, "train.max_steps=60", "train.eval_every=1000", "train.log_every=10", "optim.lr=3e-3",
        "data.test=null", cache=cache, **FT)
    return out


def _initial_classifier(cache: Path, start_model: Path, labels: list):
    """The classifier exactly as the trainer builds it before step 1 (its head init is seeded by cfg.seed)."""
    from trainer.config import FinetuneConfig, load
    from trainer.model import load_tokenizer
    from trainer.stages.finetune import build_classifier, tasks_of
    cfg = load(FinetuneConfig, str(REPO / FT["config"]), common(start_model))
    from trainer.classifier import HeadSpec
    tasks = tasks_of(cfg)
    tasks[0].vocab, tasks[0].spec = labels, HeadSpec(len(labels), tasks[0].text)
    return build_classifier(cfg, load_tokenizer(cfg.model, "grammar", cache), tasks)


def test_finetuning_moves_the_head_and_every_encoder_tensor(reference, cache, start_model):
    before = load_file(str(start_model / "model.safetensors"))
    after = load_file(str(reference / "hf_model" / "model.safetensors"))
    recipe = json.loads((reference / "hf_model" / "bert_recipe.json").read_text())
    assert recipe["format"] == "hf"
    # every step moves an Adam weight by about lr at most: STEPS steps cannot move anything further than this
    bound = STEPS * LR * 1.5
    moved = {}
    for key, w in before.items():
        if not torch.is_floating_point(w) or key.endswith("attention.self.key.bias"):
            continue  # (the key bias shifts every score of a query alike: softmax makes its gradient 0)
        moved[key] = (after["bert." + key] - w).abs().max().item()
    assert all(1e-4 < m <= bound for m in moved.values()), {k: m for k, m in moved.items() if not 1e-4 < m <= bound}
    for layer in range(LAYERS):  # every layer is in there (the check above covers each of its tensors)
        assert any(k.startswith(f"encoder.layer.{layer}.") for k in moved), layer

    initial = _initial_classifier(cache, start_model, recipe["labels"])
    init_enc = {k[len("encoder."):]: v for k, v in initial.state_dict().items() if k.startswith("encoder.")}
    for key in before:  # the reconstruction starts from the same encoder weights the run did
        assert torch.equal(init_enc[key], before[key]), key
    for name in ("weight", "bias"):
        head_before = getattr(initial.classifier, name).detach()
        delta = (after[f"classifier.{name}"] - head_before).abs().max().item()
        # the upper bound also proves the reconstructed head is the run's starting one (another random
        # init would differ by ~0.05, std 0.02); the lower bound that fine-tuning really moved it
        assert 1e-4 < delta <= bound, (name, delta)


def test_finetune_zero2_resume_1_to_2_ranks_matches_the_uninterrupted_run(reference, tmp_path, cache, start_model):
    moved = tmp_path / "moved"
    # the same global batch of 32: 1 rank accumulates 2 micro-batches of 16; then the same command on 2 ranks
    args = [*common(start_model), "train.grad_accum=2"]
    run("cpu_zero2", moved, *args, f"train.stop_at_step={STOP}", cache=cache, launcher_args=["--num_processes", "1"],
        **FT)
    proc = run("cpu_zero2", moved, *args, cache=cache, flags=["--resume"], **FT)
    assert "world size 1 -> 2: keeping the global batch of 32 samples with micro_batch_size 16 x grad_accum 1" \
        in proc.stdout + proc.stderr
    assert f"step_{STOP:08d} at step {STOP}" in proc.stdout and "written by 1 ranks" in proc.stdout

    def per_step(out: Path) -> dict:
        seen = defaultdict(list)
        for f in (out / "samples").glob("rank*.txt"):
            for line in f.read_text().splitlines():
                step, _task, *idx = line.split()
                seen[int(step)] += map(int, idx)
        return {k: sorted(v) for k, v in seen.items()}

    a_samples, b_samples = per_step(reference), per_step(moved)
    assert sorted(b_samples) == list(range(STEPS))
    for step in range(STEPS):
        assert len(a_samples[step]) == 32 and b_samples[step] == a_samples[step], step

    a = [r for r in metrics(reference) if "loss" in r]
    b = [r for r in metrics(moved) if "loss" in r]
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, STEPS + 1))
    assert [r["world_size"] for r in b] == [1] * STOP + [2] * (STEPS - STOP)
    assert len(set(a[3]["lr"])) == LAYERS + 1  # the per-layer lrs really differ
    for x, y in zip(a, b):
        assert y["samples_seen"] == x["samples_seen"]
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9), x["step"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
    wa = load_file(str(reference / "hf_model" / "model.safetensors"))
    wb = load_file(str(moved / "hf_model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_hierarchical_pooling_learns_under_zero3(hierarchical):
    results = json.loads((hierarchical / "eval_results.json").read_text())
    rows = [r for r in metrics(hierarchical) if "loss" in r]
    assert rows[-1]["zero_stage"] == 3 and rows[-1]["world_size"] == 2 and rows[-1]["engine"] == "deepspeed"
    assert results["test"]["n"] == 500
    assert results["test"]["accuracy"] > 0.6, results["test"]  # 5 balanced classes: chance is 0.2
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    recipe = json.loads((hierarchical / "hf_model" / "bert_recipe.json").read_text())
    assert recipe["text"]["strategy"] == "hierarchical" and recipe["format"] == "recipe"


def _predict(model_dir: Path, texts: list[str], tmp: Path, cache: Path) -> list[dict]:
    inp, out = tmp / "in.jsonl", tmp / "preds.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), "--model", str(model_dir),
                           "--input", str(inp), "--output", str(out), "--batch_size", "8"],
                          cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("which", ["standard head (HF format)", "hierarchical (project format)"])
def test_predict_probabilities_are_the_models_softmax(which, request, tmp_path, cache):
    """Each document alone (no padding, no length-sorted batching) through the exported model, compared with
    predict.py's batched output: same probabilities (predict.py rounds them to 6 decimals)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trainer.classifier import Classifier
    from trainer.config import TextConfig
    from trainer.data.builtin import labelled_examples
    from trainer.text.batching import Collator
    from trainer.text.truncation import Encoder

    hf = which.startswith("standard")
    model_dir = request.getfixturevalue("standard" if hf else "hierarchical") / "hf_model"
    recipe = json.loads((model_dir / "bert_recipe.json").read_text())
    assert recipe["format"] == ("hf" if hf else "recipe")
    docs = [t for (t, _), _i in zip(labelled_examples("topics", "test"), range(37))]
    preds = _predict(model_dir, docs, tmp_path, cache)
    assert len(preds) == len(docs)

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = Encoder(tok, TextConfig(**recipe["text"]))
    collate = Collator(tok.pad_token_id, not hf)
    if hf:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    else:
        model = Classifier.from_pretrained(str(model_dir))[0].eval()
    labels = [str(x) for x in recipe["labels"]]
    chunk_counts = []
    for text, pred in zip(docs, preds):
        enc = encoder.encode_pieces((tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"],))
        chunk_counts.append(len(enc))
        batch = collate([enc], [0])
        with torch.no_grad():
            if hf:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).logits
            else:
                logits = model(**batch)[1]
        want = torch.softmax(logits.float(), -1)[0]
        got = torch.tensor([pred["probabilities"][lab] for lab in labels])
        assert got.tolist() == pytest.approx(want.tolist(), abs=2e-6), text
        assert pred["label"] == labels[int(want.argmax())]
    if not hf:
        assert max(chunk_counts) >= 3 and min(chunk_counts) == 1  # documents of one and of several chunks
    # the outputs are not all alike (a constant answer would not test much)
    spread = torch.tensor([[p["probabilities"][lab] for lab in labels] for p in preds]).std(0).max().item()
    assert spread > 0.05
