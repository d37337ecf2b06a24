#!/usr/bin/env bash
# The main job: train the default model (resuming a killed run) and print its Table 2 row.
set -euo pipefail
RUN=${1:-runs/demo}
ADV=.venv/bin/advinterp
if [ -f "$RUN/resnet/model.json" ] && [ -f "$RUN/resnet/train_state.json" ]; then
    $ADV train --out "$RUN/resnet" --resume
else
    $ADV train --out "$RUN/resnet"
fi
$ADV evaluate --model "$RUN/resnet/model.safetensors" --eps 4 8 16 --out "$RUN"
echo "demo: model and Table 2 written to $RUN"
