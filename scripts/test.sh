#!/usr/bin/env bash
# The project's test command (README and CI run exactly this): sets up what is missing, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not graph"` skips the ComfyUI server tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
