#!/usr/bin/env bash
# GPU smoke of the fine-tuning paths that the CPU tests cannot reach: bf16 autocast, fused AdamW over layer-wise
# groups, pinned non-blocking copies, hierarchical attention pooling and multi-task heads on CUDA (1 process).
# Usage: bash bench/gpu/finetune_smoke.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/gpu-ft}
export BERT_RECIPE_CACHE=$out/cache PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p "$out"
run() {  # name, script, config, overrides...
  local name=$1 script=$2 config=$3; shift 3
  rm -rf "$out/$name"
  local t0=$(date +%s)
  "$PY" "launch/$script" --config "$config" output_dir="$out/$name" model.precision=bf16 "$@" > "$out/$name.log" 2>&1 \
    || { tail -30 "$out/$name.log"; return 1; }
  echo "$name: ok in $(( $(date +%s) - t0 ))s — $(grep -h 'test: accuracy\|test: acc' "$out/$name.log" | tr '\n' ' ')"
}
run ft_head_tail finetune.py configs/finetune/tiny.yaml text.strategy=head_tail optim.layer_decay=0.9 train.epochs=1
run ft_hier_attn finetune.py configs/finetune/tiny.yaml text.strategy=hierarchical text.max_len=16 text.chunk_pool=attention head.layers=last4 train.epochs=1
run mfit finetune.py configs/finetune/tiny_multitask.yaml
"$PY" - "$out" <<'PY'
import json, sys
for name in ("ft_head_tail", "ft_hier_attn"):
    r = json.load(open(f"{sys.argv[1]}/{name}/eval_results.json"))
    print(name, "test error", round(r["test"]["error_rate"], 4))
r = json.load(open(f"{sys.argv[1]}/mfit/eval_results.json"))
print("mfit test error", {t: round(v["test"]["error_rate"], 4) for t, v in r.items()})
PY
