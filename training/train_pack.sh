#!/usr/bin/env bash
# The exact commands that produced the shipped models/ from the xray-pack, in order.
# Usage: training/train_pack.sh [PACK_DIR] [RUNS_DIR]   (resumable: re-run to continue)
# Budget note: on the 2-core CPU machine these run ~2-4 min per epoch each; epochs are capped so the
# three models fit one working session. Raise --epochs on a GPU (the paper: 10 / 10 / 20).
set -euo pipefail
PACK=${1:-../shared/data/xray-pack}
RUNS=${2:-runs}
PY=${PYTHON:-.venv/bin/python}
M="$PACK/manifest.csv"

$PY -m training train --task gate --manifest "$M" --out "$RUNS/gate" --epochs "${GATE_EPOCHS:-6}" --epoch-size 3000
$PY -m training export --run "$RUNS/gate" --out models/gate --manifest "$M"

# Body part starts from the gate's backbone (it has already seen every pack radiograph).
$PY -m training train --task body_part --manifest "$M" --out "$RUNS/body_part" --epochs "${BODY_EPOCHS:-4}" \
    --epoch-size 2000 --init-from "$RUNS/gate"
$PY -m training export --run "$RUNS/body_part" --out models/body_part --manifest "$M"

# Chest starts from the body-part backbone (pretraining on every pack radiograph), paper chest recipe.
$PY -m training train --task chest --manifest "$M" --out "$RUNS/chest" --epochs "${CHEST_EPOCHS:-20}" \
    --init-from "$RUNS/body_part" --no-balance
$PY -m training export --run "$RUNS/chest" --out models/chest --manifest "$M"
