#!/usr/bin/env bash
# The main job: set up (or reuse) the virtual environment, then run the whole pipeline on
# embedded defaults (profile `default`; pass e.g. `--profile smoke` for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hyperbagel run "$@"
