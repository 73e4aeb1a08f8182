#!/usr/bin/env bash
# The project's test command (README and CI run exactly this): pytest in <repo>/.venv from the repo root.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not graph"` skips the ComfyUI server tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null; then
  echo "error: $PYTHON not found; create the environment with: bash .ci/run (or set PYTHON)" >&2
  exit 1
fi
exec "$PYTHON" -m pytest -q "$@"
