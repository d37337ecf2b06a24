#!/usr/bin/env bash
# The main job on the embedded data: train the default model, its Table 2 row,
# the paper's opt adversarial set, unit galleries (Fig. 2) and WordNet semantics (Fig. 10).
# Each stage is skipped when its output exists, so a killed demo picks up where it stopped.
set -euo pipefail
RUN=${1:-runs/demo}
ADV=.venv/bin/advinterp
MODEL="$RUN/resnet/model.safetensors"
SECONDS=0

if [ -f "$RUN/resnet/train_state.json" ]; then
    $ADV train --out "$RUN/resnet" --resume
else
    $ADV train --out "$RUN/resnet"
fi
echo "demo: [1/4] trained in ${SECONDS}s"

$ADV evaluate --model "$MODEL" --eps 4 8 16 --out "$RUN"
echo "demo: [2/4] Table 2 written to $RUN/table2.json"

if [ ! -f "$RUN/resnet-opt/attack.json" ] || ! grep -q '"stats"' "$RUN/resnet-opt/attack.json"; then
    $ADV attack --model "$MODEL" --method opt --out "$RUN/resnet-opt" --resume
fi
echo "demo: [3/4] opt adversarial set in $RUN/resnet-opt"

$ADV topk --model "$MODEL" --adversarial "$RUN/resnet-opt" --layer layer3.0.conv2 \
    --select lc --count 8 --out "$RUN/galleries"
$ADV semantics --model "$MODEL" --adversarial "$RUN/resnet-opt" --out "$RUN/semantics"
echo "demo: [4/4] galleries in $RUN/galleries, Fig. 10 in $RUN/semantics/fig10.png"
echo "demo: done in ${SECONDS}s; everything is under $RUN"
