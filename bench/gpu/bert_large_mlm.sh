#!/usr/bin/env bash
# BERT-large MLM, seq 128, bf16, ~100 steps on one GPU, through the real trainer (1 process, no DeepSpeed).
# Random init from the BERT-large shape (no hub access needed); the builtin corpus and tokenizer.
# Usage: [RUNS="compiled_b256 compiled_b512"] bash bench/gpu/bert_large_mlm.sh [OUT_DIR]
#        → prints real tokens/s and MFU per run.
set -euo pipefail
out=${1:-/tmp/bench-gpu}
export BERT_RECIPE_CACHE=$out/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
large="model.config={model_type: bert, vocab_size: 30522, hidden_size: 1024, num_hidden_layers: 24, num_attention_heads: 16, intermediate_size: 4096, max_position_embeddings: 512}"
run() {  # name, micro batch, extra overrides...
  local name=$1 mb=$2; shift 2
  rm -rf "$out/$name"
  "$PY" launch/pretrain.py --config configs/pretrain/tiny.yaml output_dir="$out/$name" "$large" \
    model.precision=bf16 data.seq_len=128 data.num_workers=4 train.micro_batch_size="$mb" train.max_steps=100 \
    train.log_every=20 train.save_every=0 optim.lr=1e-4 "$@" > "$out/$name.log" 2>&1 || { tail -30 "$out/$name.log"; return 1; }
  "$PY" - "$out/$name/metrics.jsonl" "$name" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]  # first window holds warm-up / compilation
tps = statistics.median(r["tokens_per_second"] for r in rows)
mfu = statistics.median(r.get("mfu", float("nan")) for r in rows)
print(f"{sys.argv[2]}: real tokens/s {tps:,.0f}  MFU {mfu:.1%}  (median of {len(rows)} windows of 20 steps; "
      f"final loss {rows[-1]['loss']:.3f})")
PY
}
mkdir -p "$out"
for name in ${RUNS:-eager_b128 compiled_b128 compiled_b256}; do   # <eager|compiled>_b<micro batch>
  mb=${name##*_b}
  if [[ $name == compiled_* ]]; then run "$name" "$mb" model.compile=true; else run "$name" "$mb"; fi
done
