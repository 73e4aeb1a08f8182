#!/usr/bin/env bash
# The project's test command (README and CI run exactly this): sets up what is missing, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not graph"` skips the ComfyUI server tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

# The browser test drives Debian's Chromium headless over the DevTools protocol: a test dependency, so it is
# installed here and not by the main job's set-up. Only as root where apt is available; anywhere else the test is
# skipped and says which browser is missing. apt's output goes to a log file, named only when the install fails.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    mkdir -p .host/logs
    log="$PWD/.host/logs/apt-chromium.log"
    printf '== Chromium for the browser test (%s)\n' "$(date -u +%H:%M:%S)" >&2
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >"$log" 2>&1; then
      echo "warning: Debian's chromium package could not be installed (apt log: $log); the browser test will be skipped" >&2
    fi
  else
    echo "note: no chromium (Debian package 'chromium'); the browser test will be skipped" >&2
  fi
fi

exec .venv/bin/python -m pytest -q "$@"
