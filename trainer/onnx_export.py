"""ONNX export of a classifier this trainer exported (`<run>/hf_model` → `<run>/hf_model/onnx/model.onnx`), and
the onnxruntime model `predict --backend onnx` runs in place of PyTorch.

Exporter: torch's own, `torch.onnx.export(..., dynamo=True)` (torch.export → onnxscript), maintained with the
pinned torch. Optimum's exporter is the usual route for transformers models, but optimum-onnx requires
transformers < 4.58 (this project runs 5.x), and it knows only the standard `…ForSequenceClassification` heads —
not layer choice, layer pooling or chunk pooling, which are ordinary modules to torch.export.

The graph (hub convention `onnx/model.onnx`): inputs `input_ids`, `attention_mask` (+ `token_type_ids` where the
model reads them), int64 [batch, sequence], both axes dynamic; output `logits` [batch, outputs] — the model's raw
outputs as `Classifier.forward` returns them: class logits (the reader applies softmax), label logits (sigmoid),
or values in the training data's scale (regression). A hierarchical model is exported as the model it is: its
rows are chunks, the chunking is pre-processing (predict's), and an extra input `doc_membership` [documents,
chunks] (1.0 where a chunk belongs to a document) says which chunks pool into which document; `logits` is then
[documents, outputs]. (The training code pools by a chunk → document index with scatter ops whose output size is
a data-dependent count; a membership matrix gives the exporter that size as an input shape.)

`quantize`: onnxruntime's dynamic int8 quantization (weights int8 per output channel, activations quantized per
batch at run time) into `onnx/model_quantized.onnx` — faster on CPU, at some accuracy: bench/onnx_speed.py measures both."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .classifier import RECIPE_FILE, SINGLE, Classifier
from .errors import UserError

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FILES = {"onnx": "model.onnx", "onnx-int8": "model_quantized.onnx"}  # predict's --backend → file
PARITY = 1e-4  # max |logit difference| vs PyTorch accepted at export (fp32)
# opset 23 has ONNX's own Attention op, which onnxruntime runs as one kernel; under 23 the exporter spells SDPA
# out in MatMul / Softmax nodes, 1.5× slower on this project's CPU benchmark (bench/RESULTS_onnx.md)
OPSET = 23


def _onnx_modules():
    """onnxruntime, once the packages ONNX needs are known to be there (torch's exporter imports onnxscript)."""
    import importlib.util
    for name in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(name) is None:
            raise UserError(f"ONNX needs onnx, onnxscript and onnxruntime ({name} is missing): "
                            f"pip install -e '.[onnx]'")
    import onnxruntime
    return onnxruntime


def pool_membership(features: torch.Tensor, member: torch.Tensor, mode: str,
                    scorer: Optional[nn.Module] = None) -> torch.Tensor:
    """[chunks, d] → [documents, d] by mean / max / self-attention over the chunks `member` [documents, chunks]
    assigns to each document: `classifier.pool_chunks` written with a membership matrix (module docstring)."""
    inside = member > 0
    if mode == "mean":
        return (member.to(features.dtype) @ features) / member.sum(1, keepdim=True).clamp(min=1).to(features.dtype)
    if mode == "max":
        return features.unsqueeze(0).masked_fill(~inside.unsqueeze(-1), float("-inf")).amax(1)
    scores = scorer(features).squeeze(-1).float().unsqueeze(0).masked_fill(~inside, float("-inf"))
    return torch.softmax(scores, dim=-1).to(features.dtype) @ features


def membership(doc_index: np.ndarray) -> np.ndarray:
    """The `doc_membership` input of a hierarchical graph from a batch's chunk → document index."""
    doc_index = np.asarray(doc_index)
    n = int(doc_index.max()) + 1 if len(doc_index) else 0
    return (doc_index[None, :] == np.arange(n)[:, None]).astype(np.float32)


class _Graph(nn.Module):
    """The classifier with the inputs the ONNX graph takes (see the module docstring)."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model, self.head = model, model.heads[SINGLE]

    def forward(self, input_ids, attention_mask, token_type_ids=None, doc_membership=None):
        feats = self.model.features(input_ids, attention_mask, token_type_ids)
        if doc_membership is not None:
            feats = pool_membership(feats, doc_membership, self.head.text_cfg.chunk_pool, self.head.chunk_scorer)
        return self.head(feats)[1]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines (stdout), its notes on optional torchvision ops and on axis names, and
    deprecation warnings of torch internals: none is about the user's model, all would bury the one result line."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def input_names(model: Classifier) -> list:
    return ["input_ids", "attention_mask", *(["token_type_ids"] if model.use_token_types else []),
            *(["doc_membership"] if model.hierarchical else [])]


def _example(model: Classifier, rows: int, length: int, docs: int, seed: int) -> dict:
    """Random inputs of one shape (ids inside the vocabulary, ragged attention masks)."""
    g = torch.Generator().manual_seed(seed)
    conf = model.encoder.config
    ids = torch.randint(3, conf.vocab_size, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, int(torch.randint(2, length + 1, (1,), generator=g)):] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    if model.use_token_types:  # a sentence pair: the second half is segment 1
        feed["token_type_ids"] = (torch.arange(length) >= length // 2).long().expand(rows, -1).contiguous()
    if model.hierarchical:
        doc_index = np.sort(np.concatenate([np.arange(docs), np.random.default_rng(seed).integers(0, docs, rows - docs)]))
        feed["doc_membership"] = torch.from_numpy(membership(doc_index))
    return feed


def export(model_dir: str, quantize: bool = False, overwrite: bool = False, opset: Optional[int] = None) -> dict:
    """Write `<model_dir>/onnx/model.onnx` (+ `model_quantized.onnx`), checked against PyTorch on inputs of
    another shape than the export's; → {file: path, max_abs_diff, …} (also written as onnx/export.json)."""
    ort = _onnx_modules()
    src = Path(model_dir)
    if not (src / RECIPE_FILE).is_file():
        what = "a pre-trained encoder (masked LM): fine-tune it first" if (src / "config.json").is_file() \
            else "not a model folder"
        raise UserError(f"cannot export {src} to ONNX: it is {what} (a classifier exported by this trainer has "
                        f"{RECIPE_FILE})")
    target = src / ONNX_DIR
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; pass --overwrite to replace it")
    model, recipe = Classifier.from_pretrained(src)
    model.eval()
    graph, names = _Graph(model).eval(), input_names(model)
    seq = torch.export.Dim("sequence", min=2, max=max(2, model.encoder.config.max_position_embeddings))
    rows = torch.export.Dim("chunks" if model.hierarchical else "batch", min=2)
    shapes = {n: {0: rows, 1: seq} for n in names if n != "doc_membership"}
    if model.hierarchical:
        shapes["doc_membership"] = {0: torch.export.Dim("documents", min=2), 1: rows}
    sample = _example(model, 5, 12, 2, seed=0)
    tmp = src / (ONNX_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    path = tmp / FILES["onnx"]
    model_type = model.encoder.config.model_type
    try:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(graph, (), str(path), kwargs=sample, dynamo=True, input_names=names,
                              output_names=["logits"], dynamic_shapes=shapes, opset_version=opset or OPSET,
                              optimize=True, external_data=False, verbose=False)
    except Exception as e:  # the exporter's reasons are many; the user needs the first line of it
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"torch.onnx cannot export this {model_type} classifier ({recipe['text']['strategy']}, "
                        f"head {recipe['head']['layers']}): {_first_line(e)}") from None
    try:
        info = _check_and_quantize(graph, model, recipe, tmp, path, quantize, opset or OPSET, ort)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # onnxruntime refusing the graph, the quantizer failing: one line, nothing left
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"onnxruntime cannot run or quantize the ONNX graph of this {model_type} classifier: "
                        f"{_first_line(e)}") from None
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    from . import model_card
    if (src / model_card.LINEAGE).is_file():  # the card now says how to run the ONNX files
        model_card.render(src).save(str(src / model_card.CARD))
    return {**info, "dir": str(target)}


def _first_line(e: Exception) -> str:
    """An exporter's or runtime's error as one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _check_and_quantize(graph, model, recipe, tmp: Path, path: Path, quantize: bool, opset: int, ort) -> dict:
    """Run the written graph through onnxruntime on inputs of another shape than the export's (the axes really
    are dynamic) against PyTorch; quantize; write export.json. → its contents."""
    check = _example(model, 7, 29, 3, seed=1)
    with torch.no_grad():
        expected = graph(**check).numpy()
    feed = {k: v.numpy() for k, v in check.items()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = float(np.abs(session.run(["logits"], feed)[0] - expected).max())
    if not diff <= PARITY:
        raise UserError(f"the ONNX graph of this {model.encoder.config.model_type} classifier differs from PyTorch "
                        f"by {diff:.2e} (> {PARITY:g}) on a check batch; not written")
    info = {"exporter": f"torch.onnx (dynamo) {torch.__version__}", "opset": opset, "onnxruntime": ort.__version__,
            "inputs": [i.name for i in session.get_inputs()], "output": "logits",
            "problem_type": recipe["problem_type"], "check_max_abs_diff": diff, "files": {"onnx": FILES["onnx"]}}
    if quantize:
        from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
        prepared = tmp / "model.prepared.onnx"  # shape inference + graph clean-up, as onnxruntime advises
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        # the weight matrices only: onnxruntime's quantizer would also turn opset 23's Attention into its own
        # QAttention, which does not take that op's attributes (an invalid graph). Per output channel: one scale
        # per weight column kept the test error of fp32 where one per matrix lost a point (bench/RESULTS_onnx.md)
        quantize_dynamic(str(prepared), str(tmp / FILES["onnx-int8"]), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"])
        prepared.unlink()
        quantized = ort.InferenceSession(str(tmp / FILES["onnx-int8"]), providers=["CPUExecutionProvider"])
        # reported, not checked: int8 is an approximation (bench/onnx_speed.py measures what it costs)
        info["int8_check_max_abs_diff"] = float(np.abs(quantized.run(["logits"], feed)[0] - expected).max())
        info["files"]["onnx-int8"] = FILES["onnx-int8"]
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    return info


class OnnxClassifier:
    """An exported ONNX graph behind the interface predict uses for the PyTorch model: a collated batch →
    logits (a torch tensor), on CPU through onnxruntime with as many threads as torch uses in this process."""

    def __init__(self, model_dir: str, backend: str):
        ort = _onnx_modules()
        path = Path(model_dir) / ONNX_DIR / FILES[backend]
        if not path.is_file():
            flag = " --quantize int8" if backend == "onnx-int8" else ""
            raise UserError(f"no {ONNX_DIR}/{FILES[backend]} in {model_dir}: run python launch/export.py --model "
                            f"{model_dir} --format onnx{flag}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict) -> torch.Tensor:
        feed = {}
        for name in self.inputs:
            if name == "doc_membership":
                feed[name] = membership(batch["doc_index"].numpy())
            else:
                feed[name] = batch[name].numpy().astype(np.int64)
        return torch.from_numpy(self.session.run(["logits"], feed)[0])
