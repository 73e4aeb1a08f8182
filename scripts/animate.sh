#!/usr/bin/env bash
# The main job: sets up what is missing, then animates a portrait through the shipped workflow.
#   bash scripts/animate.sh --reference portrait.png --driving talking.mp4
# Every option goes to scripts/animate.py (see --help): --steps, --acceleration, --window/--overlap, and ComfyUI's
# device and memory flags (--cpu, --lowvram, --reserve-vram GB, --use-sage-attention, ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/animate.py "$@"
