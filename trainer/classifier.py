"""Encoder + classification head: which layer(s) to read (paper Table 3) and how to pool the chunks of a long
document (paper Table 2, hierarchical). Saved so that HF `from_pretrained` loads it:
- the standard head (last layer through the pooler, no hierarchy) is exported as the model type's own
  `…ForSequenceClassification` — `AutoModelForSequenceClassification.from_pretrained(dir)` just works;
- any other head is exported in this project's format; `Classifier.from_pretrained(dir)` loads both."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import problems
from .config import HeadConfig, TextConfig
from .errors import UserError

RECIPE_FILE = "bert_recipe.json"
SINGLE = "default"  # the head name of a single-task model


def resolve_layers(spec, num_layers: int) -> list[int]:
    """Indexes into hidden_states (0 = embeddings … L). Accepts an int, a list, or first4 | last4 | all."""
    named = {"first4": [1, 2, 3, 4], "last4": list(range(num_layers - 3, num_layers + 1)),
             "all": list(range(1, num_layers + 1))}
    if isinstance(spec, str):
        if spec not in named:
            raise UserError(f"head.layers must be an index, a list of indexes, or first4|last4|all; got {spec!r}")
        return [i for i in named[spec] if 0 <= i <= num_layers]
    items = spec if isinstance(spec, list) else [spec]
    out = []
    for i in items:
        if not isinstance(i, int) or not -(num_layers + 1) <= i <= num_layers:
            raise UserError(f"head.layers entry {i!r} is outside 0..{num_layers} (or -{num_layers + 1}..-1)")
        out.append(i % (num_layers + 1))
    if not out:
        raise UserError("head.layers is empty")
    return out


def pool_chunks(features: torch.Tensor, doc_index: torch.Tensor, num_docs: int, mode: str,
                scorer: Optional[nn.Module] = None) -> torch.Tensor:
    """[chunks, d] → [docs, d] by mean / max / self-attention over each document's chunks."""
    d = features.shape[-1]
    idx = doc_index.unsqueeze(-1).expand(-1, d)
    if mode == "max":
        init = torch.full((num_docs, d), float("-inf"), dtype=features.dtype, device=features.device)
        return init.scatter_reduce(0, idx, features, reduce="amax", include_self=True)
    if mode == "mean":
        sums = torch.zeros((num_docs, d), dtype=features.dtype, device=features.device).index_add(0, doc_index, features)
        counts = torch.bincount(doc_index, minlength=num_docs).clamp(min=1).to(features.dtype)
        return sums / counts.unsqueeze(-1)
    scores = scorer(features).squeeze(-1).float()  # self-attention: softmax over each document's chunks
    top = torch.full((num_docs,), float("-inf"), device=scores.device).scatter_reduce(
        0, doc_index, scores, reduce="amax", include_self=True)
    weights = torch.exp(scores - top[doc_index])
    norm = torch.zeros(num_docs, device=scores.device).index_add(0, doc_index, weights)
    weights = (weights / norm[doc_index]).to(features.dtype).unsqueeze(-1)
    return torch.zeros((num_docs, d), dtype=features.dtype, device=features.device).index_add(
        0, doc_index, features * weights)


@contextlib.contextmanager
def plain_init():
    """Construct models whole, without DeepSpeed ZeRO-3's partitioned construction (which transformers switches
    on whenever a ZeRO-3 config exists): it is a collective, so a model built on one rank only would hang the
    others, and a partitioned model cannot take a state dict. DeepSpeed partitions the model in prepare()."""
    from transformers.integrations import deepspeed as hf_ds
    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


@contextlib.contextmanager
def _throwaway_model():
    """A model built on one rank only to learn its layout: plain and on the meta device (no memory)."""
    with plain_init(), torch.device("meta"):
        yield


@dataclass
class HeadSpec:
    """What one task's head predicts (trainer/problems.py): its outputs, long-text handling and loss settings."""
    num_outputs: int
    text: TextConfig
    problem: str = problems.SINGLE
    loss_weights: Optional[list] = None  # single_label: per-class CE weights; multi_label: per-label BCE pos_weight
    target_mean: float = 0.0  # regression: the training targets' mean and standard deviation
    target_std: float = 1.0
    thresholds: Optional[list] = None  # multi_label: probability each label needs (predict, metrics)


class TaskHead(nn.Module):
    """One task's head: (chunk pooling) → dropout → linear, and the loss of its kind. Hierarchy and chunk pooling
    are per task.

    A regression head computes in standardized units — the loss is MSE against (y − mean) / std of the training
    targets, so its scale does not depend on the data's units — and returns values in the data's own scale.
    Loss weights and the target statistics are plain numbers, not buffers: engines that cast a model to bf16
    would round buffers, and then the scale exported (fp32, `Classifier.save`) would not be the one trained."""

    def __init__(self, width: int, spec: HeadSpec, dropout: float, init_range: float):
        super().__init__()
        self.spec = spec
        self.text_cfg = spec.text
        self.hierarchical = spec.text.strategy == "hierarchical"
        self.chunk_scorer = (nn.Linear(width, 1) if self.hierarchical and spec.text.chunk_pool == "attention"
                             else None)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, spec.num_outputs)
        for lin in (self.classifier, self.chunk_scorer):
            if lin is not None:
                nn.init.normal_(lin.weight, std=init_range)
                nn.init.zeros_(lin.bias)

    def forward(self, feats, labels=None, doc_index=None):
        if doc_index is not None:
            num_docs = labels.shape[0] if labels is not None else int(doc_index.max()) + 1
            feats = pool_chunks(feats, doc_index, num_docs, self.text_cfg.chunk_pool, self.chunk_scorer)
        logits = self.classifier(self.dropout(feats))
        spec, loss = self.spec, None
        weights = (torch.tensor(spec.loss_weights, device=logits.device, dtype=torch.float32)
                   if spec.loss_weights is not None else None)
        if spec.problem == problems.REGRESSION:
            if labels is not None:
                target = (labels.float() - spec.target_mean) / spec.target_std
                loss = nn.functional.mse_loss(logits.float()[:, 0], target)
            return loss, logits.float() * spec.target_std + spec.target_mean
        if labels is not None:
            loss = (nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weights)
                    if spec.problem == problems.MULTI
                    else nn.functional.cross_entropy(logits.float(), labels, weight=weights))
        return loss, logits


class Classifier(nn.Module):
    """A shared encoder and one head per task (`tasks`: {name: HeadSpec}); a single-task model is the same with
    one head (`Classifier(encoder, num_labels, head, text)`: a single-label one). `forward(..., task=name)` runs
    the encoder and that task's head."""

    def __init__(self, encoder: nn.Module, num_labels, head: HeadConfig, text: TextConfig = None):
        super().__init__()
        tasks = num_labels if isinstance(num_labels, dict) else {SINGLE: HeadSpec(num_labels, text)}
        self.encoder = encoder
        self.head_cfg = head
        conf = encoder.config
        self.num_layers = conf.num_hidden_layers
        self.layers = resolve_layers(head.layers, self.num_layers)
        self.use_pooler = head.pooler and self.layers == [self.num_layers] and getattr(encoder, "pooler", None) is not None
        if getattr(encoder, "pooler", None) is not None and not self.use_pooler:
            encoder.pooler = None  # unused parameters would break DDP and waste optimizer state
        self.use_token_types = getattr(conf, "type_vocab_size", 0) > 1
        width = conf.hidden_size * (len(self.layers) if head.layer_pool == "concat" else 1)
        init_range = getattr(conf, "initializer_range", 0.02)
        self.heads = nn.ModuleDict({name: TaskHead(width, spec, head.dropout, init_range)
                                    for name, spec in tasks.items()})
        if head.freeze_encoder:
            encoder.requires_grad_(False)

    @property
    def config(self):  # accelerate sizes DeepSpeed buckets from model.config.hidden_size
        return self.encoder.config

    def _only_head(self) -> TaskHead:
        if len(self.heads) != 1:
            raise AttributeError("a multi-task model has one head per task: use model.heads[name]")
        return next(iter(self.heads.values()))

    @property
    def classifier(self) -> nn.Linear:
        return self._only_head().classifier

    @property
    def chunk_scorer(self):
        return self._only_head().chunk_scorer

    @property
    def text_cfg(self) -> TextConfig:
        return self._only_head().text_cfg

    @property
    def hierarchical(self) -> bool:
        return self._only_head().hierarchical

    def features(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
                 max_seqlen=None) -> torch.Tensor:
        """[CLS] features per sequence; packed input (`cu_seqlens`, see unpadded.py) reads them at each start."""
        all_layers = not (self.layers == [self.num_layers])
        kwargs = {"token_type_ids": token_type_ids} if self.use_token_types and token_type_ids is not None else {}
        if cu_seqlens is not None:
            kwargs.update(position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=all_layers,
                           **kwargs)
        starts = None if cu_seqlens is None else cu_seqlens[:-1].long()

        def cls(h):  # each sequence's [CLS]: first position of a row, or of each packed segment
            return h[:, 0] if starts is None else h[0, starts]
        if self.use_pooler:
            return out.pooler_output if cu_seqlens is None else self.encoder.pooler(cls(out.last_hidden_state)[:, None])
        if not all_layers:
            return cls(out.last_hidden_state)
        feats = [cls(out.hidden_states[i]) for i in self.layers]
        if len(feats) == 1 or self.head_cfg.layer_pool == "concat":
            return torch.cat(feats, dim=-1)
        stacked = torch.stack(feats)
        return stacked.mean(0) if self.head_cfg.layer_pool == "mean" else stacked.max(0).values

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, doc_index=None, task=None,
                **packed):
        head = self.heads[task] if task is not None else self._only_head()
        return head(self.features(input_ids, attention_mask, token_type_ids, **packed), labels, doc_index)

    # ------------------------------------------------------------------ export / load
    def task_state_dict(self, state_dict: dict, task: str) -> dict:
        """One task's standalone weights: the encoder and that task's head, named as a single-task model."""
        prefix = f"heads.{task}."
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()
                if not k.startswith("heads.") or k.startswith(prefix)}

    def save(self, target: Path, state_dict: dict, tokenizer, labels: list, text_fields: list,
             task: str = None, label_field: str = "label", label_separator: str = ",") -> None:
        """Write one task's model to `target` (a fresh dir). `state_dict`: the consolidated one (ZeRO-3 gathers
        it). The standard head is written as the model type's own `…ForSequenceClassification`, with
        `config.problem_type` set so HF pipelines apply softmax, sigmoid (multi-label) or nothing (regression).
        A regression head's standardization is folded into its weights, so every loader reads values in the
        data's scale; the statistics are kept in bert_recipe.json, and `from_pretrained` unfolds them."""
        from transformers import AutoModelForSequenceClassification
        task = task or next(iter(self.heads))
        head = self.heads[task]
        spec = head.spec
        state_dict = self.task_state_dict(state_dict, task)
        if spec.problem == problems.REGRESSION:
            state_dict = {**state_dict,
                          "classifier.weight": state_dict["classifier.weight"] * spec.target_std,
                          "classifier.bias": state_dict["classifier.bias"] * spec.target_std + spec.target_mean}
        target.mkdir(parents=True)
        conf = self.encoder.config
        conf.dtype = torch.float32  # the exported weights are fp32 (transformers 5 reloads in the saved dtype)
        conf.id2label = {i: str(lab) for i, lab in enumerate(labels)}
        conf.label2id = {str(lab): i for i, lab in enumerate(labels)}
        conf.problem_type = problems.HF_PROBLEM_TYPE[spec.problem]
        recipe = {"labels": labels, "text_fields": list(text_fields), "label_field": label_field,
                  "problem_type": spec.problem, "head": vars(self.head_cfg),
                  "text": vars(head.text_cfg), "format": "recipe"}
        if spec.problem == problems.REGRESSION:
            recipe["target"] = {"mean": spec.target_mean, "std": spec.target_std}
        if spec.problem == problems.MULTI:
            recipe["thresholds"] = [float(t) for t in spec.thresholds]
            recipe["label_separator"] = label_separator  # predict joins a row's labels with it in csv / tsv
        if spec.loss_weights is not None:
            recipe["loss_weights"] = [float(w) for w in spec.loss_weights]
        hf = None
        if self.use_pooler and not head.hierarchical:
            with _throwaway_model():
                hf = AutoModelForSequenceClassification.from_config(conf)
            prefix = self.encoder.base_model_prefix
            mapped = {(f"{prefix}.{k[len('encoder.'):]}" if k.startswith("encoder.") else k): v
                      for k, v in state_dict.items()}
            if set(mapped) == set(hf.state_dict()):
                recipe["format"] = "hf"
            else:
                hf = None
        if hf is not None:
            hf.save_pretrained(str(target), state_dict=mapped)
        else:
            conf.architectures = ["BertRecipeClassifier"]
            conf.save_pretrained(str(target))
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(target / "model.safetensors"))
        (target / RECIPE_FILE).write_text(json.dumps(recipe, indent=1, default=str))
        tokenizer.save_pretrained(str(target))
        _tokenizer_truncates_like(target, head.text_cfg)

    def is_standard(self) -> bool:
        return self.use_pooler and not self._only_head().hierarchical

    @classmethod
    def from_pretrained(cls, path, encoder: nn.Module = None) -> tuple["Classifier", dict]:
        """→ (single-task model, recipe: {labels, text_fields, problem_type, head, text, …}). `encoder`: an
        already built one (e.g. created under ZeRO-3) to load the weights into. Exports from before problem types
        existed are single-label."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel
        path = Path(path)
        recipe = read_recipe(path)
        encoder = encoder or AutoModel.from_config(AutoConfig.from_pretrained(str(path)), dtype=torch.float32)
        kind = recipe["problem_type"]
        stats = recipe.get("target", {"mean": 0.0, "std": 1.0})
        spec = HeadSpec(problems.num_outputs(kind, recipe["labels"]), TextConfig(**recipe["text"]), kind,
                        recipe.get("loss_weights"), stats["mean"], stats["std"], recipe.get("thresholds"))
        model = cls(encoder, {SINGLE: spec}, HeadConfig(**recipe["head"]))
        state = load_file(str(path / "model.safetensors"))
        if recipe["format"] == "hf":
            prefix = model.encoder.base_model_prefix + "."
            state = {("encoder." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
        state = {(k if k.startswith("encoder.") else f"heads.{SINGLE}.{k}"): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise UserError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if kind == problems.REGRESSION:  # back to standardized units (see save)
            with torch.no_grad():
                lin = model.heads[SINGLE].classifier
                lin.bias.sub_(spec.target_mean).div_(spec.target_std)
                lin.weight.div_(spec.target_std)
        return model, recipe


def read_recipe(path) -> dict:
    """An export's bert_recipe.json: {labels, text_fields, problem_type, head, text, …}; exports from before
    problem types existed are single-label."""
    path = Path(path)
    if not (path / RECIPE_FILE).is_file():
        raise UserError(f"{path} is not a model exported by this trainer (no {RECIPE_FILE})")
    recipe = json.loads((path / RECIPE_FILE).read_text())
    recipe.setdefault("problem_type", problems.SINGLE)
    return recipe


def _tokenizer_truncates_like(target: Path, text_cfg) -> None:
    """Make HF's `pipeline(..., truncation=True)` on the export cut inputs as training did where a tokenizer
    setting can say it: max_len, and the side (tail keeps the end). head+tail and hierarchical chunking have no
    tokenizer equivalent (README); `launch/predict.py` applies them."""
    path = target / "tokenizer_config.json"
    conf = json.loads(path.read_text()) if path.is_file() else {}
    conf["model_max_length"] = text_cfg.max_len
    conf["truncation_side"] = "left" if text_cfg.strategy == "tail" else "right"
    path.write_text(json.dumps(conf, indent=2))
