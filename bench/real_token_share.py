"""Share of real (non-pad) tokens in pre-training batches.

Builds the batches exactly as `trainer/stages/pretrain.py` does — prepare_corpus → GlobalOrder → PackedDataset →
RankBatches → MLMCollator in a torch DataLoader — and counts attention_mask ones / all positions over every
sample of one epoch (positions [0, epoch_len) of the global stream). Two corpora: builtin:grammar (with the
builtin tokenizer, as configs/pretrain/tiny.yaml) and the first N IMDb unsup reviews (all-MiniLM-L6-v2
tokenizer if installed, else the builtin one). Goal: >= 99 % real tokens.

    python bench/real_token_share.py [--docs 10000] [--seq-len 128] [--micro-batch 16]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import _common as C

GOAL = 0.99


def epoch_share(corpus_path: str, tokenizer_spec: str, seq_len: int, micro_batch: int, seed: int,
                vocab_size: int) -> dict:
    import torch
    from trainer.config import PretrainConfig, build

    cfg = build(PretrainConfig, {
        "seed": seed,
        "model": {"tokenizer": tokenizer_spec, "tokenizer_vocab_size": vocab_size},
        "data": {"corpora": [{"path": corpus_path}], "seq_len": seq_len, "num_workers": 0},
        "train": {"micro_batch_size": micro_batch},
    })
    tokenizer, corpora, order, loader = C.pretrain_batches(cfg)  # the stage's own steps
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    real = total = doc_tokens = samples = batches = 0
    masked = 0
    for batch in loader:
        keep = batch["positions"] < order.epoch_len  # the last batch may run into the next epoch
        att = batch["attention_mask"][keep]
        labels = batch["labels"][keep]
        ids = batch["input_ids"][keep]
        real += int(att.sum())
        total += att.numel()
        masked += int((labels != -100).sum())
        # document tokens: real positions that are neither [CLS]/[SEP] nor (after masking) special
        orig = torch.where(labels != -100, labels, ids)
        doc_tokens += int((att.bool() & ~torch.isin(orig, special)).sum())
        samples += int(keep.sum())
        batches += 1
        if not bool(keep.all()) or int(batch["positions"][-1]) == order.epoch_len - 1:
            break
    meta = corpora[0].meta
    return {"corpus": corpus_path, "rows": order.epoch_len, "samples": samples, "batches": batches,
            "real": real, "total": total, "share": real / total, "doc_share": doc_tokens / total,
            "mask_rate": masked / max(1, doc_tokens), "documents": meta["documents"],
            "doc_tokens": meta["doc_tokens"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10000, help="IMDb unsup reviews in the subset (default 10000)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--builtin-vocab", type=int, default=1000, help="builtin tokenizer vocab (tiny.yaml: 1000)")
    ap.add_argument("--tokenizer", choices=("auto", "builtin"), default="auto",
                    help="IMDb tokenizer: auto = all-MiniLM-L6-v2 if installed, else builtin")
    args = ap.parse_args()

    C.header("real_token_share")
    spec, tok_name = C.tokenizer_spec(prefer_real=args.tokenizer == "auto")
    tmp = Path(tempfile.mkdtemp(prefix="share-bench-data-"))
    results = []
    try:
        jsonl = C.write_jsonl(C.imdb_texts(args.docs), tmp / "imdb_subset.jsonl")
        runs = [("builtin:grammar", "builtin", "builtin tokenizer"),
                (str(jsonl), spec, tok_name)]
        for path, tspec, tname in runs:
            r = epoch_share(path, tspec, args.seq_len, args.micro_batch, args.seed, args.builtin_vocab)
            label = "builtin:grammar" if path.startswith("builtin:") else f"IMDb unsup first {args.docs}"
            r["label"] = label
            results.append(r)
            print(f"{label} [{tname}], seq_len {args.seq_len}, micro-batch {args.micro_batch}: "
                  f"{r['documents']:,} docs, {r['doc_tokens']:,} doc tokens -> {r['rows']:,} rows; "
                  f"epoch = {r['samples']:,} samples in {r['batches']:,} batches")
            print(f"  real (attention_mask=1): {r['real']:,} / {r['total']:,} = {100 * r['share']:.3f} %   "
                  f"(document tokens, i.e. excluding [CLS]/[SEP]: {100 * r['doc_share']:.2f} %; "
                  f"masked {100 * r['mask_rate']:.2f} % of document tokens)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = all(r["share"] >= GOAL for r in results)
    parts = ", ".join(f"{r['label']} {100 * r['share']:.3f} %" for r in results)
    print(f"SUMMARY real_token_share (seq_len {args.seq_len}): {parts} -> goal >= {100 * GOAL:.0f} % "
          f"{'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
