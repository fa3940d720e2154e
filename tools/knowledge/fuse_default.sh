#!/usr/bin/env bash
# Give a bundle the answer-time knowledge and ship it as the embedded default:
#   the word trigram LM of ../shared/data/lm (tools lm convert), the exact phrase memory of
#   the training split of chinese-poetry (tools memory build), the characters around each of the
#   LM's idioms in the training split of FewCLUE, its unlabeled ChID passages counted for their likely
#   answers (tools idioms build), the fusion weights fitted on
#   the development data (tools fusion fit), evaluated fused and model-only (tools evaluate),
#   installed as edge/default_bundle (tools ship) when SHIP=1.
#
#   tools/knowledge/fuse_default.sh [RUN_DIR] [SOURCE_BUNDLE]     (defaults: runs/fused, edge/default_bundle)
#
# lm.bin, memory.bin and idioms.bin come out byte for byte the same for the same inputs, so re-running
# this after a retrained model adds no second copy of them to git. ~10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-runs/fused}
SOURCE=${2:-edge/default_bundle}
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared}
mkdir -p "$RUN"
rm -rf "$RUN/bundle" && cp -r "$SOURCE" "$RUN/bundle"
"$PY" -m tools lm convert --bundle "$RUN/bundle" --arpa "$SHARED/data/lm/lm_sc.arpa-20220810.tar.xz" \
  --license-id LGPL-2.1-or-later \
  --provenance "libime (fcitx) lm_sc.arpa-20220810, Debian source package libime 1.0.16-1; a word trigram LM of modern Chinese"
"$PY" -m tools memory build --bundle "$RUN/bundle" --corpus "$SHARED/data/poetry" --license-id MIT \
  --provenance "chinese-poetry (github.com/chinese-poetry/chinese-poetry, commit 99ebbef), training split"
"$PY" -m tools idioms build --bundle "$RUN/bundle" --corpus "$SHARED/data/fewclue" \
  --provenance "FewCLUE (github.com/CLUEbenchmark/FewCLUE, commit 62a02c6), training split" \
  --license "FewCLUE publishes no license file; only counts are stored, no text"
"$PY" -m tools fusion fit --bundle "$RUN/bundle" --data "$SHARED/data"
# The held-apart passages, as pretrain writes them (the cloze test; the fit left out the ones measured here).
"$PY" - "$RUN/test_passages.txt" "$SHARED/data" <<'PYEOF'
import sys
from tools.train.wwm import held_apart_passages
open(sys.argv[1], "w", encoding="utf-8").write("".join(p + "\n" for p in held_apart_passages(sys.argv[2])))
PYEOF
eval_cmd=(python -m tools evaluate --bundle "$RUN/bundle" --cloze-text "$RUN/test_passages.txt"
          --max-cloze 2000 --threads 2 --report "$RUN/eval")
"$PY" "${eval_cmd[@]:1}"
if [ -n "${SHIP:-}" ]; then
  "$PY" -m tools ship --bundle "$RUN/bundle" --evaluation "$RUN/eval/evaluation.json" \
    --command "${eval_cmd[*]}" --notes "${NOTES:-}"
fi
