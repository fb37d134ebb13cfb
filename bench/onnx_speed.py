"""ONNX (onnxruntime) vs PyTorch predict on this machine's CPU, side by side in one run: examples/s of
`trainer.predict.predict_file` for the same model and file with --backend torch / onnx / onnx-int8 (alternating
passes, median), each backend's test error, and its parity with PyTorch (max |output difference|, labels
that agree). The input is tokenized into the cache once before timing, so the passes measure the model plus
predict's own reading and writing. The model folder is copied: the export is not touched.

    python bench/onnx_speed.py --model runs/<run>/hf_model --input ../shared/data/trec/test.jsonl
    python bench/onnx_speed.py --model <imdb run>/hf_model --input ../shared/data/imdb/test.jsonl.gz --limit 1000
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import header, median  # (importing _common sets the cache dir, offline env, repo on sys.path)

BACKENDS = ("torch", "onnx", "onnx-int8")


def subset(path: Path, limit: int, seed: int, into: Path) -> Path:
    """A seeded random `limit` rows of a jsonl(.gz) file (the whole file with limit 0)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if limit:
        random.Random(seed).shuffle(lines)
        lines = lines[:limit]
    out = into / "input.jsonl"
    out.write_text("".join(lines))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a classifier exported by fine-tuning (<run>/hf_model)")
    ap.add_argument("--input", required=True, help="labelled jsonl(.gz), e.g. a test split")
    ap.add_argument("--limit", type=int, default=0, help="a seeded random subset of this many rows (0: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per backend (alternating)")
    ap.add_argument("--batch_size", type=int, default=64)
    args = ap.parse_args()
    from trainer.onnx_export import export
    from trainer.predict import predict_file
    header("ONNX vs PyTorch predict (CPU)")
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    try:
        model = work / "model"
        shutil.copytree(args.model, model, ignore=shutil.ignore_patterns("onnx"))
        t = time.perf_counter()
        info = export(str(model), quantize=True)
        print(f"model: {args.model} · export (fp32 + int8) {time.perf_counter() - t:.1f} s · opset {info['opset']} "
              f"· {info['exporter']} · onnxruntime {info['onnxruntime']}")
        inp = subset(Path(args.input), args.limit, 0, work)
        rows = sum(1 for _ in inp.open())
        print(f"input: {args.input}{f' (seeded subset of {args.limit})' if args.limit else ''}: {rows} rows · "
              f"batch {args.batch_size}")
        predict_file(str(model), str(inp), str(work / "warm.jsonl"), progress=False)  # tokenize once, untimed
        speed = {b: [] for b in BACKENDS}
        first = {}
        for _ in range(args.repeats):
            for b in BACKENDS:
                t = time.perf_counter()
                s = predict_file(str(model), str(inp), str(work / f"{b}.jsonl"), backend=b, overwrite=True,
                                 return_outputs=True, progress=False, batch_size=args.batch_size)
                speed[b].append(rows / (time.perf_counter() - t))
                first.setdefault(b, s)
        ref = first["torch"]
        kind = ref["metrics"]["problem_type"]
        from trainer.problems import DEFAULT_METRIC
        metric = DEFAULT_METRIC[kind]
        column = {"single_label": "label", "multi_label": "labels"}.get(kind)  # regression: no label to agree on
        labels = {b: [json.loads(line)[column] for line in (work / f"{b}.jsonl").open()] if column else []
                  for b in BACKENDS}
        print(f"\n| backend | examples/s (median of {args.repeats}) | × PyTorch | test {metric} | "
              "max abs output diff vs PyTorch | same prediction |")
        print("|---|---|---|---|---|---|")
        for b in BACKENDS:
            diff = float(np.abs(first[b]["outputs"] - ref["outputs"]).max())
            agree = f"{100 * np.mean([x == y for x, y in zip(labels[b], labels['torch'])]):.1f} %" if column else "–"
            value = first[b]["metrics"][metric]
            shown = f"{100 * value:.2f} %" if metric != "pearson" else f"{value:.4f}"
            print(f"| {b} | {median(speed[b]):.1f} | {median(speed[b]) / median(speed['torch']):.2f} | {shown} | "
                  f"{diff:.1e} | {agree} |")
        print(f"\nSUMMARY onnx {median(speed['onnx']) / median(speed['torch']):.2f}x, "
              f"onnx-int8 {median(speed['onnx-int8']) / median(speed['torch']):.2f}x of PyTorch; fp32 max diff "
              f"{float(np.abs(first['onnx']['outputs'] - ref['outputs']).max()):.1e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
