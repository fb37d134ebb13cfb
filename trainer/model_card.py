"""The model card of every export: `README.md`, written through huggingface_hub's `ModelCard` / `ModelCardData`
(the hub's metadata schema, validated by the library that reads it back), and the `lineage.json` it is made from.

Lineage: each stage that exports a model records what made it — its data, steps, lr, ξ, truncation and max_len,
seed, results and the engine that really ran (the loop's `engine_facts`, not the config's wish) — and appends
that record to the lineage of the model it started from, when that model was exported by this trainer. So the
final model of a recipe carries the whole chain (e.g. ITPT → MFiT → FiT), and a model fine-tuned later from any
export keeps its history. The card is a pure function of the export folder (lineage.json, bert_recipe.json,
config.json, onnx/): `launch/export.py` re-renders it after adding ONNX files.

Publishing is `hf upload <user>/<name> <export dir>` (huggingface_hub's CLI); nothing here uploads."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Optional

from . import problems
from .classifier import SINGLE

LINEAGE = "lineage.json"
CARD = "README.md"
LIBRARY_TAG = "bert-recipe-trainer"
PAPER = "https://arxiv.org/abs/1905.05583"
HUB_METRIC = {"error_rate": "error_rate", "accuracy": "accuracy", "macro_f1": "f1", "micro_f1": "f1",
              "exact_match": "exact_match", "pearson": "pearsonr", "spearman": "spearmanr", "mse": "mse",
              "mae": "mae"}
AVERAGE = {"macro_f1": "macro", "micro_f1": "micro"}  # model-index metric config: how an F1 is averaged
PRETRAIN_KIND = {"ITPT": "within-task", "IDPT": "in-domain", "CDPT": "cross-domain"}


def hardware() -> str:
    """The accelerator (or CPU) this process trained on, as a person would name it."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _hub_id(path, fmt: str) -> Optional[str]:
    """A hub dataset's id (for the card's `datasets`); None for local files, folders and builtin data."""
    from .data.builtin import BUILTIN_PREFIX
    from .data.records import looks_like_hub_name
    if not isinstance(path, str) or path.startswith(BUILTIN_PREFIX) or os.path.exists(path) \
            or fmt not in ("hub", "auto"):
        return None
    return path if fmt == "hub" or looks_like_hub_name(path) else None


def _paths(path) -> list:
    return path if isinstance(path, list) else [path]


def _hub_model(name: Optional[str]) -> bool:
    """Whether a model.name_or_path names a hub model (no such local folder, and shaped like `org/name`)."""
    return bool(name) and not os.path.exists(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def _key(task: Optional[str]) -> str:
    """A task's key in a record's results: its name, or `default` for the one task of a single-task run."""
    return task or SINGLE


def _without_tables(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "confusion_matrix"}


def stage_record(name: str, cfg: dict, trained: dict, samples_per_epoch: int, results: Optional[dict] = None,
                 selection: Optional[dict] = None) -> dict:
    """One stage's entry in the lineage. `cfg`: the run's resolved config (as saved in config.yaml); `trained`:
    what the loop ran ({steps, samples, best_step, engine facts, world_size}); `results` ({task: {split:
    metrics}}) and `selection` ({task: metric}) for fine-tuning."""
    optim = cfg["optim"]
    record = {
        "stage": name, "output_dir": cfg["output_dir"], "start": cfg["model"]["name_or_path"],
        # decided now, while the paths a run names exist: a card re-rendered elsewhere must not take a moved
        # local folder for a hub name
        "start_on_hub": _hub_model(cfg["model"]["name_or_path"]),
        "steps": trained["steps"], "epochs": round(trained["samples"] / max(1, samples_per_epoch), 3),
        "global_batch": trained["global_batch"], "lr": optim["lr"], "scheduler": optim["scheduler"],
        "warmup": (f"{optim['warmup_steps']} steps" if optim["warmup_steps"] else
                   f"ratio {optim['warmup_ratio']:g}"), "weight_decay": optim["weight_decay"],
        "seed": cfg["seed"], "resumed": trained.get("resumed", False),
        "setup": {k: trained[k] for k in ("engine", "zero_stage", "offload", "precision", "optimizer",
                                          "world_size", "micro_batch_size", "grad_accum", "hardware")},
    }
    if "corpora" in cfg["data"]:  # masked-LM pre-training
        data = cfg["data"]
        record.update(kind="pretrain", corpora=[{"path": c["path"], "format": c["format"], "weight": c["weight"],
                                                 "hub": [d for d in (_hub_id(p, c["format"]) for p in
                                                                     _paths(c["path"])) if d]}
                                                for c in data["corpora"]],
                      seq_len=data["seq_len"], mlm_probability=data["mlm_probability"],
                      whole_word_mask=data["whole_word_mask"], nsp=data["nsp"])
        return record
    tasks = cfg["tasks"] or [{"name": None, "data": cfg["data"], "text": cfg["text"]}]
    record.update(
        kind="multitask" if cfg["tasks"] else "finetune", layer_decay=optim["layer_decay"],
        head={k: cfg["head"][k] for k in ("layers", "layer_pool", "pooler", "freeze_encoder")},
        best_step=trained.get("best_step"),
        tasks=[{"name": t["name"], "problem_type": t["data"]["problem_type"],
                **{split: t["data"][split] for split in ("train", "dev", "test")},
                "format": t["data"]["format"], "hub": _hub_id(t["data"]["train"], t["data"]["format"]),
                "dev_ratio": t["data"]["dev_ratio"], "text_fields": t["data"]["text_fields"],
                "few_shot": (f"{t['data']['few_shot_fraction']:g} of train" if t["data"]["few_shot_fraction"] else
                             f"{t['data']['few_shot_per_class']} per class" if t["data"]["few_shot_per_class"]
                             else None),
                "text": dict(t["text"]), "select_metric": (selection or {}).get(t["name"])} for t in tasks],
        results={_key(task): {split: _without_tables(r) for split, r in splits.items()}
                 for task, splits in (results or {}).items()})
    return record


def lineage_of(start: Optional[str]) -> list:
    """The stages recorded in the model a run starts from (none for a hub model or a plain checkpoint)."""
    path = Path(start) / LINEAGE if start else None
    return json.loads(path.read_text())["stages"] if path is not None and path.is_file() else []


def write(folder: Path, record: dict, card: dict, task: Optional[str] = None, final: Optional[Path] = None) -> None:
    """lineage.json (the start model's stages + this one) and README.md into an export folder (main process);
    `final`: where the folder will be once renamed into place (the card names it)."""
    lineage = {"stages": [*lineage_of(record["start"]), record], "task": task, "card": card}
    (folder / LINEAGE).write_text(json.dumps(lineage, indent=1, default=str))
    render(folder, final).save(str(folder / CARD))


# ----------------------------------------------------------------------------- the card
def render(folder: Path, final: Optional[Path] = None):
    """The card of an export folder, from its files (module docstring); `final`: the path it names (default
    `folder`)."""
    from huggingface_hub import ModelCard, ModelCardData
    folder = Path(folder)
    model_dir = Path(final or folder)
    lineage = json.loads((folder / LINEAGE).read_text())
    stages, card, task = lineage["stages"], lineage["card"], lineage["task"]
    recipe_path = folder / "bert_recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else None
    config = json.loads((folder / "config.json").read_text())
    last = stages[-1]
    name = "-".join(x for x in (card.get("model_name") or Path(last["output_dir"]).name, task) if x)
    base = card.get("base_model") or (stages[0]["start"] if stages[0].get("start_on_hub") else None)
    hub_data = [d for s in stages for d in _datasets_of(s)]
    kind = recipe["problem_type"] if recipe else None
    tags = [LIBRARY_TAG, config.get("model_type", "bert"), *(["onnx"] if (folder / "onnx").is_dir() else []),
            *([kind.replace("_", "-")] if kind else ["masked-lm"]), *card.get("tags", [])]
    data = ModelCardData(
        model_name=name, base_model=base, datasets=list(dict.fromkeys(hub_data)) or None,
        language=card.get("language") or None, license=card.get("license"),
        library_name="transformers" if recipe is None or recipe.get("format") == "hf" else LIBRARY_TAG,
        pipeline_tag="text-classification" if recipe else "fill-mask", tags=list(dict.fromkeys(tags)),
        eval_results=_eval_results(last, task, kind) or None)
    body = [f"# {name}", "", _summary(stages, recipe, base), "", *_lineage_section(stages)]
    if recipe:
        body += [*_results_section(last, task, recipe), *_usage_section(folder, model_dir, recipe, name),
                 *_limits_section(recipe, last, task)]
    else:
        body += [*_pretrained_usage(), ""]
    body += ["## Publish", "", "```bash", f"hf upload <user>/{name} {model_dir}", "```", "",
             f"Written by {LIBRARY_TAG}, following Sun et al. 2019, *How to Fine-Tune BERT for Text "
             f"Classification?* ({PAPER})."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _datasets_of(stage: dict) -> list:
    if stage["kind"] == "pretrain":
        return [d for c in stage["corpora"] for d in c["hub"]]
    return [t["hub"] for t in stage["tasks"] if t["hub"]]


def _task_of(stage: dict, task: Optional[str]) -> dict:
    return next((t for t in stage["tasks"] if t["name"] == task), stage["tasks"][0])


def _eval_results(stage: dict, task: Optional[str], kind: Optional[str]) -> list:
    """The model-index entries: this model's test (and dev) metrics, on the data it was fine-tuned on."""
    from huggingface_hub import EvalResult
    if kind is None or stage["kind"] == "pretrain":
        return []
    t = _task_of(stage, task)
    result = stage["results"][_key(t["name"])]
    dataset = t["hub"] or Path(str(t["train"])).stem or "custom"
    out = []
    for split in ("test", "dev"):
        for metric in problems.METRICS_OF[kind]:
            if metric in result.get(split, {}):
                out.append(EvalResult(task_type="text-classification", dataset_type=dataset,
                                      dataset_name=t["name"] or dataset, dataset_split=split,
                                      metric_type=HUB_METRIC[metric], metric_name=f"{metric} ({split})",
                                      metric_config=AVERAGE.get(metric),
                                      metric_value=round(float(result[split][metric]), 6)))
    return out


def _stage_title(stage: dict) -> str:
    """ITPT: further pre-training (masked LM, within-task) · MFiT: multi-task fine-tuning · FiT: fine-tuning."""
    name = stage["stage"]
    if stage["kind"] == "pretrain":
        what = PRETRAIN_KIND.get(name)
        done = f"{'further ' if stage['start'] else ''}pre-training (masked LM{', ' + what if what else ''})"
        return f"{name}: {done}" if what else done
    return f"{name}: {'multi-task fine-tuning' if stage['kind'] == 'multitask' else 'fine-tuning'}"


def _summary(stages: list, recipe: Optional[dict], base: Optional[str]) -> str:
    chain = " → ".join(s["stage"] for s in stages)
    start = stages[0]["start"]
    origin = f"`{base}`" if base else (f"`{start}`" if start else "a randomly initialised encoder")
    if recipe is None:
        return f"A BERT-family encoder with its masked-LM head, made from {origin} by {chain}."
    labels = recipe["labels"]
    what = {problems.SINGLE: f"single-label classifier over {len(labels)} classes",
            problems.MULTI: f"multi-label classifier over {len(labels)} labels",
            problems.REGRESSION: "regression model"}[recipe["problem_type"]]
    return f"A {what}, made from {origin} by {chain}."


def _setup(s: dict) -> str:
    st = s["setup"]
    engine = f"DeepSpeed ZeRO-{st['zero_stage']}" if st["engine"] == "deepspeed" else st["engine"].upper() \
        if st["engine"] == "ddp" else "single process"
    offload = f", offload {st['offload']}" if st["offload"] != "none" else ""
    return (f"{engine}{offload}, {st['precision']}, {st['world_size']} × {st['hardware']}, {st['optimizer']}, "
            f"micro-batch {st['micro_batch_size']} × accumulation {st['grad_accum']}")


def _text(text: dict) -> str:
    strategy = text["strategy"]
    extra = {"head_tail": f", first {text['head_tokens']} tokens + the rest from the end",
             "hierarchical": f", up to {text['max_chunks']} chunks, {text['chunk_pool']}-pooled"}.get(strategy, "")
    return f"{strategy} truncation, max_len {text['max_len']}{extra}"


def _data(t: dict) -> str:
    splits = ", ".join(f"{split} `{t[split]}`" for split in ("train", "dev", "test") if t[split])
    if not t["dev"]:
        splits += f", dev carved from train ({t['dev_ratio']:.0%}, stratified)"
    few = f", few-shot {t['few_shot']}" if t["few_shot"] else ""
    return f"{splits}{few} ({t['problem_type']})"


def _lineage_section(stages: list) -> list:
    lines = ["## Lineage", "", "Each stage started from the model the previous one exported:", ""]
    for i, s in enumerate(stages, 1):
        start = f"`{s['start']}`" if s["start"] else "random initialisation"
        lines.append(f"{i}. **{_stage_title(s)}** — from {start}, {s['steps']} steps ({s['epochs']} epochs) of "
                     f"{s['global_batch']} examples, lr {s['lr']:g} ({s['scheduler']}, warm-up {s['warmup']}), "
                     f"weight decay {s['weight_decay']:g}, seed {s['seed']}.")
        if s["kind"] == "pretrain":
            corpora = "; ".join(f"`{c['path']}` (weight {c['weight']:g})" for c in s["corpora"])
            lines.append(f"   - text: {corpora}; sequences of {s['seq_len']} tokens, {s['mlm_probability']:.0%} "
                         f"masked{', whole words' if s['whole_word_mask'] else ''}{', with NSP' if s['nsp'] else ''}")
        else:
            lines.append(f"   - layer-wise lr decay ξ = {s['layer_decay']:g}; head: layers {s['head']['layers']} "
                         f"({s['head']['layer_pool']}), pooler {s['head']['pooler']}"
                         f"{', encoder frozen' if s['head']['freeze_encoder'] else ''}")
            for t in s["tasks"]:
                head = f"task {t['name']}: " if t["name"] else ""
                lines.append(f"   - {head}{_data(t)}; {_text(t['text'])}")
        resumed = " (resumed after an interruption: the setup that finished it)" if s.get("resumed") else ""
        lines.append(f"   - trained on {_setup(s)}{resumed}; run dir `{s['output_dir']}`")
    return lines + [""]


def _fmt(metric: str, value: float) -> str:
    return f"{value:.4f}" if metric in ("pearson", "spearman", "mse", "mae") else f"{100 * value:.2f} %"


def _results_section(stage: dict, task: Optional[str], recipe: dict) -> list:
    t = _task_of(stage, task)
    result, kind = stage["results"][_key(t["name"])], recipe["problem_type"]
    names = problems.METRICS_OF[kind]
    lines = ["## Results", "", "| split | examples | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for split, r in result.items():
        lines.append(f"| {split} | {r['n']} | " + " | ".join(_fmt(m, r[m]) for m in names) + " |")
    best = f" (step {stage['best_step']} of {stage['steps']})" if stage.get("best_step") else ""
    lines += ["", f"The checkpoint kept is the best on dev by {t['select_metric'] or problems.DEFAULT_METRIC[kind]}"
              f"{best}; test was evaluated once, on that checkpoint. Seed {stage['seed']}.", ""]
    report = result.get("test", {}).get("per_class") or result.get("test", {}).get("per_label")
    if report:
        what = "class" if kind == problems.SINGLE else "label"
        lines += [f"Test, per {what}:", "", f"| {what} | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {lab} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
                  for lab, r in report.items()]
        lines.append("")
    return lines


def _pipeline_ready(recipe: dict) -> bool:
    """HF's pipeline reproduces training's input handling: a standard head, and a cut a tokenizer can make."""
    return recipe.get("format") == "hf" and recipe["text"]["strategy"] in ("head", "tail")


def _usage_section(folder: Path, model_dir: Path, recipe: dict, name: str) -> list:
    kind, fields = recipe["problem_type"], recipe["text_fields"]
    where = f"<user>/{name}"  # after `hf upload` (a local dir works the same)
    lines = ["## How to use", ""]
    if _pipeline_ready(recipe):
        extra = {problems.MULTI: ", top_k=None", problems.REGRESSION: ", function_to_apply=\"none\""}.get(kind, "")
        example = ('{"text": "first sentence", "text_pair": "second sentence"}' if len(fields) == 2
                   else '"An example text."')
        lines += ["```python", "from transformers import pipeline", "",
                  f"classifier = pipeline(\"text-classification\", model=\"{where}\", truncation=True{extra})",
                  f"classifier({example})", "```", ""]
        if kind == problems.MULTI:
            cut = ", ".join(f"{lab}: {t:.2f}" for lab, t in zip(recipe["labels"], recipe["thresholds"]))
            lines += [f"A label is predicted when its score reaches its threshold ({cut}).", ""]
        if kind == problems.REGRESSION:
            lines += ["The score is the predicted value, in the training data's scale.", ""]
    else:
        why = ("its head (layer choice / pooling)" if recipe.get("format") != "hf"
               else f"its `{recipe['text']['strategy']}` input handling, which no tokenizer setting reproduces")
        lines += [f"HF's `pipeline` cannot reproduce {why}; predict with the trainer, which prepares inputs exactly "
                  "as training did:", ""]
    lines += ["```bash", f"python launch/predict.py --model {model_dir} --input data.jsonl --output predictions.jsonl",
              "```", ""]
    if (folder / "onnx" / "model.onnx").is_file():
        lines += ["ONNX (`onnx/model.onnx`, exported with `launch/export.py --format onnx`) runs the same "
                  "predictions through onnxruntime: add `--backend onnx` to the line above"
                  + (" (`--backend onnx-int8` for the dynamically quantized `onnx/model_quantized.onnx`)"
                     if (folder / "onnx" / "model_quantized.onnx").is_file() else "") + ".", ""]
    return lines


def _limits_section(recipe: dict, stage: dict, task: Optional[str]) -> list:
    text, kind = recipe["text"], recipe["problem_type"]
    labels = ", ".join(f"`{lab}`" for lab in recipe["labels"]) if kind != problems.REGRESSION else None
    lines = ["## Limits", "", f"- Inputs were cut by {_text(text)} (fields: {', '.join(recipe['text_fields'])}); "
             "longer texts lose what training never saw."]
    if labels:
        lines.append(f"- {'Classes' if kind == problems.SINGLE else 'Labels'}: {labels}; nothing outside them.")
    t = _task_of(stage, task)
    lines.append(f"- Trained on `{t['train']}` only; results on other text are unmeasured.")
    return lines + [""]


def _pretrained_usage() -> list:
    return ["## How to use", "", "An encoder to fine-tune (its masked-LM head is kept for more pre-training):", "",
            "```bash", "python launch/finetune.py --config configs/finetune/<yours>.yaml "
            "model.name_or_path=<this folder>", "```"]
