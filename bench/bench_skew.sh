#!/usr/bin/env bash
# Skew of detection + alignment (docs/results.md, "Through detection"): train hard_sharing and dmm_cnn on the
# real CelebA crops (their face template is measured on the training images), then evaluate each on the
# held-out test split twice: the crops fed whole, as in training, and through the detector and alignment,
# as a user's photos go. Goal of issue #10: detect loses at most 1 accuracy point against whole.
#   bash bench/bench_skew.sh [OUT]        (needs ../shared/data; writes OUT/<name>.{whole,detect}.json)
#   JITTER=1 bash bench/bench_skew.sh OUT  the same models trained with --align-jitter 1 (names end in _jitter1)
#   ONLY=hard_sharing ...                  one of the two
#   FACES=detect ...                       trained through detection too (jobs.train --faces detect, issue #19;
#                                          names end in _detect); LIMIT=N / VAL_LIMIT=N: fewer training images
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${1:-/tmp/faceattr-skew}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
common=(--workers ${WORKERS:-1} --threads 1 --storage "$OUT/runs" --max-failures 1 ${JITTER:+--align-jitter $JITTER}
        ${FACES:+--faces $FACES} ${LIMIT:+--limit $LIMIT} ${VAL_LIMIT:+--val-limit $VAL_LIMIT})
SUFFIX=${JITTER:+_jitter$JITTER}${FACES:+_$FACES}${LIMIT:+_n$LIMIT}

run() {  # name model data extra-args...
  local name=$1 model=$2 data=$3; shift 3
  local t0=$SECONDS
  [ -f "$OUT/$name.pt" ] || $PY -m jobs.train --model "$model" --data "$data" --name "$name" \
    --output "$OUT/$name.pt" "${common[@]}" "$@" | tee "$OUT/$name.train.log"
  for faces in whole detect; do
    $PY -m jobs.evaluate --checkpoint "$OUT/$name.pt" --data "$data" --split test --faces $faces \
      --json "$OUT/$name.$faces.json" | tee "$OUT/$name.$faces.log"
  done
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}

[ -n "${ONLY:-}" ] && [ "$ONLY" != hard_sharing ] || run hard_sharing$SUFFIX hard_sharing "celeba:$DATA/celeba" --epochs ${HS_EPOCHS:-6}
[ -n "${ONLY:-}" ] && [ "$ONLY" != dmm_cnn ] || run dmm_cnn$SUFFIX dmm_cnn "celeba:$DATA/celeba" --epochs ${DMM_EPOCHS:-3} --image-size 64 --model-arg depth=18 \
  --optimizer adam --lr 0.001 --batch-size 32 --validate-every 50
$PY - "$OUT" "$SUFFIX" <<'PY'
import json, os, sys
out, suffix = sys.argv[1], sys.argv[2]
print(f"{'model':<14}{'metric':<22}{'whole':>9}{'detect':>9}{'diff':>8}   images whole/detect (no face)")
for name, keys in (("hard_sharing", ["gender.accuracy", "eyeglasses.accuracy", "mean_accuracy"]),
                   ("dmm_cnn", ["Male.accuracy", "Smiling.accuracy", "Eyeglasses.accuracy", "mean_accuracy"])):
    name += suffix
    if not os.path.exists(f"{out}/{name}.detect.json"):
        continue
    w = json.load(open(f"{out}/{name}.whole.json"))
    d = json.load(open(f"{out}/{name}.detect.json"))
    for k in keys:
        print(f"{name:<14}{k:<22}{100 * w[k]:>8.2f}%{100 * d[k]:>8.2f}%{100 * (d[k] - w[k]):>+7.2f}   "
              f"{int(w['n_images'])}/{int(d['n_images'])} ({int(d.get('images_without_face', 0))})")
PY
