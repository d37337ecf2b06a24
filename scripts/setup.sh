#!/usr/bin/env bash
# Set up everything advinterp needs: Debian data packages and a pinned virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS="dataset-fashion-mnist wordnet-base wordnet-sense-index"
need_debs=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need_debs+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || need_debs+=(wordnet-base)
[ -f /usr/share/wordnet/index.sense ] || need_debs+=(wordnet-sense-index)
if [ ${#need_debs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages ${need_debs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_debs[@]}" >/dev/null
    else
        echo "setup: missing data; run as root: apt-get install $DEBS" >&2
        exit 1
    fi
fi

# Only the report's browser test needs Chromium: without root, say how and go on.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's chromium (the report's browser test opens every page)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "setup: the report's browser test needs Chromium; run as root: apt-get install chromium" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
echo "setup: installing pinned Python packages (requirements.lock)"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import advinterp, torch, torchvision" || { echo "setup: the virtualenv is broken; remove .venv and run again" >&2; exit 1; }
touch .venv/.installed
