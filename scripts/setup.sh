#!/usr/bin/env bash
# Builds what the project's commands need, idempotently: the virtual environment .venv with the pinned
# packages, and the ComfyUI 0.3.75 host with this pack linked in. A second run takes seconds.
# Test-only system packages (Chromium for the browser test) are installed by scripts/test.sh, not here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" >&2; }

PYTHON_BIN="$(command -v python3.11 || command -v python3)"
case "$("$PYTHON_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" in
  3.11) ;;
  *) echo "error: Python 3.11 is needed (mediapipe 0.10.21 and the local torch wheels), found $PYTHON_BIN" >&2; exit 1 ;;
esac

if [ ! -x .venv/bin/python ]; then
  step "virtual environment .venv"
  "$PYTHON_BIN" -m venv .venv
fi

# Reinstall only when the requirement files changed since the last successful install.
wanted="$(cat requirements-dev.txt requirements.txt | sha256sum | cut -d' ' -f1)"
stamp=.venv/.flashportrait-requirements.sha256
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  step "Python packages"
  # pip names each local package index it skips for a package; those lines say nothing, so they are dropped.
  .venv/bin/python -m pip install --progress-bar off --disable-pip-version-check -q \
    -r requirements-dev.txt -r requirements.txt 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  echo "$wanted" > "$stamp"
fi

step "ComfyUI host"
.venv/bin/python scripts/host.py provision >&2
