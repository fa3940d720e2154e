#!/usr/bin/env bash
# Distilled student vs the same student trained from scratch for the same wall time,
# vs the teacher: build each into an INT8 bundle and evaluate all of them on the same
# items in one report (Markdown + PNG, with latency through the edge runtime).
#
#   tools/train/distill_compare.sh [TEACHER_CHECKPOINT] [MINUTES] [OUT]
#   (make distill-compare TEACHER=… MINUTES=… OUT=…)
#
# Run on a quiet machine: the training budgets are wall-clock minutes, so anything else
# using the CPU shortens every run alike but adds noise to the comparison.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
TEACHER=${1:-runs/wwm-4x128-mixed/checkpoint}
MINUTES=${2:-12}
OUT=${3:-runs/distill}
STUDENT=${STUDENT:-2x128x4x512}
SEQ=${SEQ:-64}
BATCH=${BATCH:-64}
[ -f "$TEACHER/config.json" ] || { echo "error: $TEACHER: no teacher checkpoint (config.json)" >&2; exit 2; }
mkdir -p "$OUT"
data_cache() {  # reuse the teacher's prepared corpus when it sits beside it
  local dir=$1
  if [ -d "$(dirname "$TEACHER")/data" ] && [ ! -e "$dir/data" ]; then
    mkdir -p "$dir" && cp -r "$(dirname "$TEACHER")/data" "$dir/data"
  fi
}
# The vocabulary the teacher's corpus cache was trimmed from: the same settings let the
# students reuse that cache (and give them the teacher's vocabulary).
BASE_VOCAB=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["settings"]["base_vocab"])' \
  "$(dirname "$TEACHER")/data/prep.json" 2>/dev/null || echo "$TEACHER/vocab.txt")
log() { echo "== $(date -u +%H:%M:%S) $*"; }

for init in random teacher-layers; do
  run="$OUT/distill-$init"
  if [ ! -f "$run/checkpoint/training.json" ]; then
    data_cache "$run"
    log "distilling $STUDENT from $TEACHER (init $init, $MINUTES min)"
    "$PY" -m tools distill --teacher "$TEACHER" --run-dir "$run" --student-shape "$STUDENT" --init "$init" \
      --seq-len "$SEQ" --batch-size "$BATCH" --max-minutes "$MINUTES" --mask-unit mixed --base-vocab "$BASE_VOCAB" \
      --log-every 100
  fi
done
run="$OUT/scratch"
if [ ! -f "$run/checkpoint/training.json" ]; then
  data_cache "$run"
  log "training $STUDENT from scratch ($MINUTES min: length warm-up, mixed masking)"
  "$PY" -m tools pretrain --run-dir "$run" --shape "$STUDENT" --seq-len "$SEQ" --max-position "$SEQ" \
    --batch-size "$BATCH" --seq-schedule 16:0.3,32:0.6 --mask-unit mixed --lr 1e-3 --warmup 0.03 \
    --max-minutes "$MINUTES" --log-every 100
fi

bundles=()
names=()
for pair in "teacher:$TEACHER" "distilled-random-init:$OUT/distill-random/checkpoint" \
            "distilled-teacher-layers:$OUT/distill-teacher-layers/checkpoint" "scratch:$OUT/scratch/checkpoint"; do
  name=${pair%%:*}
  ckpt=${pair#*:}
  bundle="$OUT/bundle-$name"
  if [ ! -f "$bundle/manifest.json" ]; then
    log "building $bundle"
    "$PY" -m tools build --source "$ckpt" --out "$bundle" --vocab 0 --name "$name"
  fi
  bundles+=(--bundle "$bundle")
  names+=(--name "$name")
done
log "evaluating"
cloze=$(dirname "$TEACHER")/data/test_passages.txt
"$PY" -m tools evaluate "${bundles[@]}" "${names[@]}" --cloze-text "$cloze" --max-cloze 2000 \
  --report "$OUT/report" --threads 2
log "report: $OUT/report/evaluation.md"
