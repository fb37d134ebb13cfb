"""Helpers of bench/gpu/run_all.sh (not a user tool).

  python3 bench/gpu/run_all_report.py exports WORK     reload every `hf_model/` of WORK/<run>/ with from_pretrained,
                                                         check fp32 weights and a forward pass → WORK/exports.json
  python3 bench/gpu/run_all_report.py summary WORK OUT  WORK/steps.tsv + each run's metrics.jsonl → OUT/summary.md

`summary` imports nothing heavy (it runs after every step, so a run cut short still leaves a summary)."""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

TEXTS = ["the chef simmered the sauce", "the striker scored a late goal", "the bank raised rates"]
STEP_FIELDS = ("name", "kind", "launch", "status", "seconds", "run_dir", "peak_mem_mib", "note")


# ---------------------------------------------------------------------------------------------------- exports
def _check_one(model_dir: Path, device: str) -> str:
    """'ok: …' or raises. A pre-training export: AutoModelForMaskedLM. A classifier export (bert_recipe.json): the
    trainer's own Classifier.from_pretrained + predict_file (what predict and the next stage use), and, for the
    standard head (format "hf"), AutoModelForSequenceClassification too. Every loaded model must be all fp32."""
    import torch
    import transformers

    def forward(model, kind):
        dtypes = {p.dtype for p in model.parameters()}
        if dtypes != {torch.float32}:
            raise AssertionError(f"{kind}: parameter dtypes {sorted(map(str, dtypes))}, expected fp32")
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        batch = tok(TEXTS, return_tensors="pt", padding=True)
        model.to(device).eval()
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        if not torch.isfinite(logits).all():
            raise AssertionError(f"{kind}: non-finite logits")
        return f"{kind} fp32, forward {tuple(logits.shape)}"

    recipe_file = model_dir / "bert_recipe.json"
    if not recipe_file.is_file():
        return f"ok: {forward(transformers.AutoModelForMaskedLM.from_pretrained(str(model_dir)), 'MaskedLM')} on {device}"
    recipe = json.loads(recipe_file.read_text())
    from trainer.classifier import Classifier
    from trainer.predict import predict_file
    model, _ = Classifier.from_pretrained(model_dir)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise AssertionError(f"Classifier.from_pretrained: parameter dtypes {sorted(map(str, dtypes))}")
    src, dst = model_dir.parent / "_check_in.jsonl", model_dir.parent / "_check_out.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert predict_file(str(model_dir), str(src), str(dst), overwrite=True)["predicted"] == len(TEXTS)
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows), rows
    done = f"Classifier fp32 + predict_file ({recipe['format']} format)"
    if recipe["format"] == "hf":
        done += "; " + forward(transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir)),
                               "SeqCls")
    return f"ok: {done} on {device}"


def exports(work: Path) -> int:
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = read_steps(work)
    result, bad = {}, 0
    for step in steps:
        if step["kind"] not in ("train", "recipe") or not step["run_dir"]:
            continue
        run_dir = Path(step["run_dir"])
        dirs = sorted(p for p in run_dir.rglob("hf_model") if p.is_dir()) if run_dir.is_dir() else []
        checks = {}
        for d in dirs:
            t0 = time.time()
            try:
                checks[str(d.relative_to(run_dir))] = _check_one(d, device) + f" ({time.time() - t0:.1f}s)"
            except Exception as exc:  # every export is checked; the failure is recorded, not raised
                checks[str(d.relative_to(run_dir))] = f"FAIL: {type(exc).__name__}: {str(exc)[:300]}"
            print(f"{step['name']}/{d.relative_to(run_dir)}: {checks[str(d.relative_to(run_dir))]}", flush=True)
        n_ok = sum(v.startswith("ok") for v in checks.values())
        bad += len(checks) - n_ok
        result[step["name"]] = {"ok": n_ok, "total": len(checks), "checks": checks}
        (work / "exports.json").write_text(json.dumps(result, indent=1))  # after each run: a timeout keeps the rest
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------- summary
def read_steps(work: Path) -> list[dict]:
    path = work / "steps.tsv"
    if not path.is_file():
        return []
    return [dict(zip(STEP_FIELDS, line.split("\t"))) for line in path.read_text().splitlines() if line.strip()]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return [r for r in rows if "loss" in r and "split" not in r]  # training windows (not eval lines)


def _median(values):
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(values) if values else None


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def _seq_len(run: Path) -> int | None:
    """A pre-training run's own data.seq_len (its config.yaml), read without importing yaml."""
    path = run / "config.yaml"
    text = path.read_text() if path.is_file() else ""
    m = re.search(r"^  seq_len: (\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def _run_figures(run: Path, seq_len: int | None) -> dict:
    rows = _metrics(run)
    if not rows:
        return {}
    later = rows[1:] or rows  # the first window holds warm-up (allocator, kernels, first steps)
    tps = _median(r.get("tokens_per_second") for r in later)
    facts = sorted({f"{r.get('engine')}/{r.get('zero_stage')}/{r.get('offload')}/{r.get('precision')}" for r in rows})
    return {"facts": ", ".join(facts), "optimizer": ", ".join(sorted({str(r.get("optimizer")) for r in rows})),
            "steps": rows[-1].get("step"), "loss": f"{rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f}",
            "tps": tps, "seqs": tps / seq_len if tps and seq_len else None,
            "eps": _median(r.get("samples_per_second") for r in later),
            "mfu": _median(r.get("mfu") for r in later), "windows": len(later),
            "mem": _median(r[k] for r in later for k in r if "mem" in k.lower())}


SPEED_RATIOS = [  # (numerator step, denominator step, figure, what, goal)
    ("large_zero2_s128", "large_single_s128", "tps", "BERT-large seq 128: ZeRO-2 ÷ plain tokens/s", None),
    ("ft_grouped", "ft_hf_padded", "eps", "fine-tuning examples/s: trainer (length-grouped) ÷ HF-style padded loop",
     1.8),
    ("ft_unpadded", "ft_hf_padded", "eps", "fine-tuning examples/s: trainer unpadded ÷ HF-style padded loop", 1.8),
    ("ft_grouped", "ft_hf_trainer", "eps", "fine-tuning examples/s: trainer (length-grouped) ÷ HF Trainer "
     "(group_by_length), both ZeRO-2 bf16", 1.0),
    ("ft_unpadded", "ft_hf_trainer", "eps", "fine-tuning examples/s: trainer unpadded ÷ HF Trainer (issue 20)", 1.3),
    ("ft_groups_xi", "ft_grouped", "eps", "ξ = 0.95 (a group per layer) ÷ one group, examples/s under ZeRO-2", 0.95),
]


def _speed_ratios(work: Path, steps: list[dict]) -> list[str]:
    runs = {s["name"]: Path(s["run_dir"]) for s in steps if s.get("run_dir")}
    out = []
    for num, den, key, what, goal in SPEED_RATIOS:
        if num in runs and den in runs:
            a, b = _run_figures(runs[num], None).get(key), _run_figures(runs[den], None).get(key)
            if a and b:
                out.append(f"{what}: {a:,.1f} / {b:,.1f} = **{a / b:.2f}×**" +
                           (f" (goal ≥ {goal}: {'met' if a / b >= goal else 'NOT met'})" if goal else ""))
    return out


def summary(work: Path, out: Path) -> None:
    steps = read_steps(work)
    meta = json.loads((work / "meta.json").read_text()) if (work / "meta.json").is_file() else {}
    exports_json = json.loads((work / "exports.json").read_text()) if (work / "exports.json").is_file() else {}
    seq_len = meta.get("seq_len")
    lines = [f"# bench/gpu/run_all.sh — {meta.get('mode', '?')}", ""]
    for key in ("device", "versions", "shape", "started"):
        if meta.get(key):
            lines.append(f"- {key}: {meta[key]}")
    lines += ["", "Figures: each run's own `metrics.jsonl` (training windows); tokens/s, seq/s (tokens/s ÷ seq_len; "
              "packed rows) and MFU are medians over the windows after the first. Peak GPU memory: the most "
              "`nvidia-smi` showed used during the step (sampled every 250 ms; includes the CUDA context and "
              "PyTorch's cached blocks), `–` where there is no nvidia-smi. The recipe row's figures are those of its "
              "pre-training stage; its engine column lists what every stage ran under.", "",
              "| step | launch | status | time s | engine/ZeRO/offload/precision | optimizer | steps | loss | "
              "tokens/s | seq/s | examples/s | MFU | peak GPU mem MiB | export check |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for s in steps:
        if s["kind"] not in ("train", "recipe", "finetune"):
            lines.append(f"| {s['name']} | {s['launch']} | {s['status']} | {s['seconds']} | | | | | | | | | | |")
            continue
        run = Path(s["run_dir"]) if s["run_dir"] else None
        if run is None or not run.is_dir():
            lines.append(f"| {s['name']} | {s['launch']} | {s['status']} | {s['seconds']} | – | – | – | – | – | – | "
                         f"– | – | {s['peak_mem_mib'] or '–'} | not run |")
            continue
        fig = _run_figures(run / "pretrain" if s["kind"] == "recipe" else run, None if s["kind"] == "finetune" else
                           _seq_len(run) or seq_len if s["kind"] == "train" else meta.get("recipe_seq_len"))
        facts = fig.get("facts", "–")
        if s["kind"] == "recipe":  # every stage must have run under the setup it was launched with
            stage_facts = {str(p.parent.relative_to(run)): _run_figures(p.parent, None).get("facts", "–")
                           for p in sorted(run.rglob("metrics.jsonl"))}
            distinct = sorted(set(stage_facts.values()))
            facts = f"{', '.join(distinct)} ({len(stage_facts)} stages{'' if len(distinct) == 1 else ': DIFFER'})"
            details.append(("recipe stages", "\n".join(f"- `{k}`: {v}" for k, v in stage_facts.items())))
            if (run / "results.md").is_file():
                details.append(("recipe results (`results.md`)", (run / "results.md").read_text().strip()))
        ex = exports_json.get(s["name"])
        ex_cell = "not run" if ex is None else (f"{ex['ok']}/{ex['total']} ok" if ex["total"] else "no hf_model")
        if ex and ex["ok"] < ex["total"]:
            ex_cell = f"**{ex_cell}**"
        mem = s["peak_mem_mib"] or _fmt(fig.get("mem"), ".0f")
        mfu = fig.get("mfu")
        lines.append(f"| {s['name']} | {s['launch']} | {s['status']} | {s['seconds']} | {facts} | "
                     f"{fig.get('optimizer', '–')} | {fig.get('steps', '–')} | {fig.get('loss', '–')} | "
                     f"{_fmt(fig.get('tps'), ',.0f')} | {_fmt(fig.get('seqs'), ',.0f')} | "
                     f"{_fmt(fig.get('eps'), ',.1f') if s['kind'] == 'finetune' else '–'} | "
                     f"{'–' if mfu is None else f'{mfu:.1%}'} | {mem or '–'} | {ex_cell} |")
        if ex and ex["checks"]:
            details.append((f"exports of {s['name']}", "\n".join(f"- `{k}`: {v}" for k, v in ex["checks"].items())))
    ratios = _speed_ratios(work, steps)
    if ratios:
        lines += ["", "Ratios (issue 12 and 20 goals):"] + [f"- {r}" for r in ratios]
    notes = [s for s in steps if s.get("note")]
    if notes:
        lines += ["", "Notes:"] + [f"- {s['name']}: {s['note']}" for s in notes]
    for title, body in details:
        lines += ["", f"### {title}", "", body]
    lines += ["", "Logs: the other files beside this one (`<step>.log`, each ending with its metrics.jsonl tail)."]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["exports"]:
        sys.exit(exports(Path(sys.argv[2])))
    if sys.argv[1:2] == ["summary"]:
        summary(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(__doc__)
