#!/usr/bin/env bash
# The main job on the embedded data: the whole paper in one command (advinterp reproduce):
# the normal model and its -Adv/-AT fine-tunes, Tables 1 and 2, Fig. 10, the galleries and
# the HTML report. Each stage is cached in the run folder, so a killed demo picks up where
# it stopped.
set -euo pipefail
RUN=${1:-runs/demo}
SECONDS=0
.venv/bin/advinterp reproduce --out "$RUN"
echo "demo: done in ${SECONDS}s; open $RUN/report/index.html in a browser (no server needed)"
