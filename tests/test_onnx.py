"""ONNX export (launch/export.py --format onnx) and predict --backend onnx: every head the export supports, on
the model families, matches PyTorch through the same predict path; bad input is refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launching import REPO, env, error_lines, free_port
from tiny_data import rows, write_jsonl
from trainer.classifier import Classifier, HeadSpec
from trainer.config import HeadConfig, TextConfig

V = 1000  # the builtin tokenizer's vocabulary (conftest's tiny_tokenizer)


def _encoder(family: str):
    import transformers as T
    small = dict(vocab_size=V, num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=130)
    make = {
        "bert": lambda: T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=48, **small)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(hidden_size=32, intermediate_size=48, pad_token_id=1,
                                                          **small)),
        "electra": lambda: T.ElectraModel(T.ElectraConfig(embedding_size=16, hidden_size=32, intermediate_size=48,
                                                          **small)),
        "albert": lambda: T.AlbertModel(T.AlbertConfig(embedding_size=16, hidden_size=32, intermediate_size=48,
                                                       **small)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=V, dim=32, n_layers=3, n_heads=2,
                                                                   hidden_dim=48, max_position_embeddings=130)),
        "deberta-v2": lambda: T.DebertaV2Model(T.DebertaV2Config(
            hidden_size=32, intermediate_size=48, relative_attention=True, position_buckets=8,
            norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"], **small)),
    }[family]
    return make()


HIER = dict(strategy="hierarchical", max_len=16, max_chunks=4)
# name → (family, head, text, problem type)
CASES = {
    "bert-standard": ("bert", {}, {}, "single_label"),
    "bert-last4-concat": ("bert", {"layers": "last4"}, {}, "single_label"),
    "bert-all-mean": ("bert", {"layers": "all", "layer_pool": "mean"}, {}, "single_label"),
    "bert-two-layers-max": ("bert", {"layers": [1, -1], "layer_pool": "max"}, {}, "single_label"),
    "bert-head-tail": ("bert", {}, {"strategy": "head_tail", "max_len": 24, "head_tokens": 8}, "single_label"),
    "bert-sentence-pairs": ("bert", {"layers": "last4"}, {"max_len": 24}, "single_label"),
    "bert-hierarchical-mean": ("bert", {}, {**HIER, "chunk_pool": "mean"}, "single_label"),
    "bert-hierarchical-max": ("bert", {}, {**HIER, "chunk_pool": "max"}, "single_label"),
    "bert-hierarchical-attention": ("bert", {}, {**HIER, "chunk_pool": "attention"}, "single_label"),
    "bert-multi-label": ("bert", {}, {}, "multi_label"),
    "bert-regression-hierarchical": ("bert", {}, {**HIER, "chunk_pool": "attention"}, "regression"),
    "roberta": ("roberta", {}, {}, "single_label"),
    "electra-last4": ("electra", {"layers": "last4"}, {}, "single_label"),
    "albert": ("albert", {}, {}, "single_label"),
    "distilbert": ("distilbert", {}, {}, "single_label"),
    "deberta-v2": ("deberta-v2", {}, {}, "single_label"),
}


def save_classifier(target: Path, tokenizer, family="bert", head=None, text=None, kind="single_label",
                    fields=("text",)) -> Path:
    """A classifier export as fine-tuning writes it (random weights: parity needs no training)."""
    torch.manual_seed(0)
    text_cfg = TextConfig(**{"max_len": 64, **(text or {})})
    labels = ["food", "sport", "tech"] if kind != "regression" else []
    spec = HeadSpec(1 if kind == "regression" else 3, text_cfg, kind, target_mean=3.0, target_std=2.0,
                    thresholds=[0.4, 0.5, 0.6] if kind == "multi_label" else None)
    model = Classifier(_encoder(family), {"default": spec}, HeadConfig(**(head or {}))).eval()
    for name, p in model.heads.named_parameters():  # an untrained encoder's features differ little from text to
        torch.nn.init.normal_(p, std=5.0 if "classifier.weight" in name else 0.5)  # text: a head that shows it
    model.save(target, model.state_dict(), tokenizer, labels, list(fields))
    return target


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """Short and long rows (a long one makes several hierarchical chunks and is cut by head / head+tail)."""
    records = rows(30, 5)
    records += [{"text": " ".join(r["text"] for r in rows(6, 100 + i)), "label": "tech"} for i in range(5)]
    return write_jsonl(tmp_path_factory.mktemp("texts") / "in.jsonl", records)


def _predict(model_dir, inp, out, backend, batch_size=64):
    from trainer.predict import predict_file
    return predict_file(str(model_dir), str(inp), str(out), backend=backend, return_outputs=True, progress=False,
                        batch_size=batch_size, overwrite=True)


def _read(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("case", CASES)
def test_onnx_predicts_what_pytorch_predicts(case, tiny_tokenizer, texts, tmp_path):
    from trainer.onnx_export import export
    family, head, text, kind = CASES[case]
    fields = ("text", "text_pair") if case == "bert-sentence-pairs" else ("text",)
    model_dir = save_classifier(tmp_path / "model", tiny_tokenizer, family, head, text, kind, fields)
    if len(fields) == 2:  # each row a pair: segment ids 0 and 1 reach the graph's token_type_ids
        records = [json.loads(line) for line in texts.read_text().splitlines()]
        texts = write_jsonl(tmp_path / "pairs.jsonl", [{"text": a["text"], "text_pair": b["text"], "label": a["label"]}
                                                       for a, b in zip(records, records[::-1])])
    info = export(str(model_dir))
    assert info["check_max_abs_diff"] <= 1e-4
    names = ["input_ids", "attention_mask"]
    assert info["inputs"][:2] == names and ("doc_membership" in info["inputs"]) == (text.get("strategy") ==
                                                                                     "hierarchical")
    a = _predict(model_dir, texts, tmp_path / "torch.jsonl", "torch")
    b = _predict(model_dir, texts, tmp_path / "onnx.jsonl", "onnx")
    assert a["outputs"].shape == b["outputs"].shape == (35, 1 if kind == "regression" else 3)
    assert np.abs(a["outputs"] - b["outputs"]).max() <= 1e-4
    column = {"single_label": "label", "multi_label": "labels", "regression": "value"}[kind]
    torch_rows, onnx_rows = _read(tmp_path / "torch.jsonl"), _read(tmp_path / "onnx.jsonl")
    if kind == "regression":
        assert [r[column] for r in onnx_rows] == pytest.approx([r[column] for r in torch_rows], abs=1e-4)
    else:
        assert [r[column] for r in onnx_rows] == [r[column] for r in torch_rows]
    assert a["outputs"].std(0).min() > 1e-3  # outputs depend on the input: the comparison is not of constants
    one = _predict(model_dir, texts, tmp_path / "one.jsonl", "onnx", batch_size=1)  # a batch of one row / document
    assert np.abs(one["outputs"] - a["outputs"]).max() <= 1e-4


def _cli(script: str, *args, cache: Path, processes: int = 1):
    head = [sys.executable, str(REPO / "launch" / script)] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "launch" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", str(processes),
        "--main_process_port", str(free_port()), str(REPO / "launch" / script)]
    return subprocess.run([*head, *map(str, args)], cwd=REPO, env=env(cache), capture_output=True, text=True,
                          timeout=600)


def test_cli_export_int8_and_two_process_onnx_predict_match_pytorch_with_bad_rows(tiny_tokenizer, texts, tmp_path):
    model_dir = save_classifier(tmp_path / "model", tiny_tokenizer, "bert", {"layers": "last4"})
    cache = tmp_path / "cache"
    proc = _cli("export.py", "--model", model_dir, "--format", "onnx", "--quantize", "int8", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (model_dir / "onnx").iterdir()) == ["export.json", "model.onnx",
                                                                      "model_quantized.onnx"]
    info = json.loads((model_dir / "onnx" / "export.json").read_text())
    assert info["opset"] == 23 and info["check_max_abs_diff"] <= 1e-4 and "int8_check_max_abs_diff" in info
    inp = tmp_path / "in.jsonl"  # bad rows: not JSON, no text
    lines = texts.read_text().splitlines()
    inp.write_text("\n".join([lines[0], "{not json", json.dumps({"text": ""}), *lines[1:]]) + "\n")
    out = {}
    for backend, n in (("torch", 1), ("onnx", 2), ("onnx-int8", 1)):
        out[backend] = tmp_path / f"{backend}.jsonl"
        proc = _cli("predict.py", "--model", model_dir, "--input", inp, "--output", out[backend], "--backend", backend,
                    cache=cache, processes=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b, q = (_read(out[k]) for k in ("torch", "onnx", "onnx-int8"))
    assert len(a) == len(b) == len(q) == 37
    assert [r["label"] for r in b] == [r["label"] for r in a]
    assert [r["error"] for r in b] == [r["error"] for r in a] and b[1]["error"] and b[2]["error"]
    for x, y in zip(a, b):
        assert list(y["probabilities"].values()) == pytest.approx(list(x["probabilities"].values()), abs=1e-5)
    assert Path(f"{out['onnx']}.bad_rows.jsonl").read_text() == Path(f"{out['torch']}.bad_rows.jsonl").read_text()
    agree = np.mean([x["label"] == y["label"] for x, y in zip(a, q)])
    assert agree >= 0.8  # int8 is an approximation: most labels, not all, are the same


def test_bad_input_is_refused_in_one_line(tiny_tokenizer, texts, tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    cache = tmp_path / "cache"
    mlm = tmp_path / "mlm"
    BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=48)).save_pretrained(mlm)
    model_dir = save_classifier(tmp_path / "model", tiny_tokenizer)
    cases = [
        (("export.py", "--model", mlm, "--format", "onnx"), "pre-trained encoder"),
        (("export.py", "--model", tmp_path / "nowhere", "--format", "onnx"), "not a model folder"),
        (("predict.py", "--model", model_dir, "--input", texts, "--output", tmp_path / "p.jsonl", "--backend",
          "onnx"), "launch/export.py"),
    ]
    for args, says in cases:
        proc = _cli(*args, cache=cache)
        errors = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(errors) == 1 and says in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p.jsonl").exists() and not (mlm / "onnx").exists()
    assert _cli("export.py", "--model", model_dir, "--format", "onnx", cache=cache).returncode == 0
    before = (model_dir / "onnx" / "model.onnx").read_bytes()
    proc = _cli("export.py", "--model", model_dir, "--format", "onnx", cache=cache)
    assert proc.returncode == 2 and "--overwrite" in error_lines(proc.stderr)[0]
    assert (model_dir / "onnx" / "model.onnx").read_bytes() == before


def test_an_export_the_exporter_cannot_handle_is_refused_naming_why(tiny_tokenizer, tmp_path, monkeypatch):
    """What the exporter raises (here: an operator it lacks) becomes one line naming the model and the reason,
    and nothing is left behind."""
    from trainer.errors import UserError
    from trainer.onnx_export import export
    model_dir = save_classifier(tmp_path / "model", tiny_tokenizer)

    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::fancy_op\nlong details")
    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", unsupported)
        with pytest.raises(UserError, match=r"cannot export this bert classifier .*RuntimeError: Unsupported "
                                            r"operator aten::fancy_op$"):
            export(str(model_dir))
    assert sorted(p.name for p in model_dir.iterdir() if "onnx" in p.name) == []

    import onnxruntime  # the graph written, but the runtime refuses it (or the quantizer fails): the same
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: unsupported())
    with pytest.raises(UserError, match=r"onnxruntime cannot run or quantize .* RuntimeError: Unsupported"):
        export(str(model_dir))
    assert sorted(p.name for p in model_dir.iterdir() if "onnx" in p.name) == []


def test_membership_pooling_is_the_training_pooling():
    from trainer.classifier import pool_chunks
    from trainer.onnx_export import membership, pool_membership
    torch.manual_seed(0)
    feats, doc_index = torch.randn(7, 5), np.array([0, 0, 1, 2, 2, 2, 3])
    scorer = torch.nn.Linear(5, 1)
    for mode in ("mean", "max", "attention"):
        a = pool_chunks(feats, torch.from_numpy(doc_index), 4, mode, scorer)
        b = pool_membership(feats, torch.from_numpy(membership(doc_index)), mode, scorer)
        assert torch.allclose(a, b, atol=1e-6), mode
