"""The baseline of issue 12 item 4: an HF-style fine-tuning loop — random batches, each padded to its longest
example — on the same model, data, truncation, lr and batch as the trainer's run it is compared with.

It reads the trainer run's resolved config (`<run>/config.yaml`) and its exported encoder config
(`<run>/hf_model/config.json`), builds the same encoder + head
(trainer.classifier.Classifier) and the same head+tail inputs (the trainer's own Encoder on the prepared store, so
only the batching differs), and trains `--steps` steps with torch AdamW (fused on CUDA) under bf16 autocast.
Writes `<out>/metrics.jsonl` lines in the trainer's format (`samples_per_second`, `tokens_per_second`, `loss`,
`step`), so bench/gpu/run_all_report.py reads both alike.

    python bench/gpu/hf_padded_loop.py --like RUN_DIR --out OUT_DIR [--steps 60] [--log-every 10]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.config import FinetuneConfig, load  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", required=True, help="a finished trainer run dir (its config.yaml is used)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()
    from trainer.classifier import Classifier
    from trainer.data.cache import default_cache_dir
    from trainer.model import load_tokenizer
    from trainer.text.batching import Collator
    from trainer.text.tasks import load_task
    from trainer.text.truncation import Encoder
    from transformers import AutoConfig, AutoModel

    cfg = load(FinetuneConfig, str(Path(args.like) / "config.yaml"), [])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg.model.precision == "bf16"
    tokenizer = load_tokenizer(cfg.model, "grammar", default_cache_dir())
    splits, vocab = load_task(cfg.data, cfg.seed, tokenizer, default_cache_dir())
    train = splits["train"]
    torch.manual_seed(cfg.seed)
    conf = AutoConfig.from_pretrained(Path(args.like) / "hf_model")  # the encoder config the trainer ran
    encoder = AutoModel.from_config(conf, attn_implementation="sdpa", dtype=torch.float32)
    model = Classifier(encoder, len(vocab), cfg.head, cfg.text).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, fused=device == "cuda")
    enc, collate = Encoder(tokenizer, cfg.text), Collator(tokenizer.pad_token_id, False)
    rng = np.random.default_rng(cfg.seed)
    mb = cfg.train.micro_batch_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines, t0, samples, tokens, loss_sum = [], time.perf_counter(), 0, 0, 0.0
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(train), mb, replace=False)  # a random batch, padded to its longest
        batch = collate([enc.encode_pieces(train.pieces(int(j))) for j in idx], train.labels[idx])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples += mb
        tokens += int(batch["attention_mask"].sum())
        loss_sum += loss.detach().float()
        if step % args.log_every == 0:
            loss_value = float(loss_sum) / args.log_every  # (one host sync per window, as the trainer's)
            elapsed = time.perf_counter() - t0
            lines.append({"step": step, "loss": loss_value, "samples_per_second": samples / elapsed,
                          "tokens_per_second": tokens / elapsed, "engine": "hf-style loop", "zero_stage": None,
                          "offload": "none", "precision": "bf16" if bf16 else "fp32", "optimizer": "AdamW"})
            t0, samples, tokens, loss_sum = time.perf_counter(), 0, 0, 0.0
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    print(f"{args.steps} steps; last window {lines[-1]['samples_per_second']:.1f} examples/s" if lines else "no window")


if __name__ == "__main__":
    main()
