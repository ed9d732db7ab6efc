#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the pinned lock.
# Idempotent: with an unchanged lock it returns at once.
#
# The lock (requirements.lock) is complete and installed with --no-deps by uv, which
# installs ~250 pinned wheels in about 2 minutes where pip takes far longer. torch is
# pinned to 2.13.0 and must be the CPU build: uv takes it from pip's configured
# find-links (a local wheel folder) when one is set; elsewhere point UV_FIND_LINKS or
# UV_EXTRA_INDEX_URL at a source of CPU wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HYPERBAGEL_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if ! "$PY" -m uv --version >/dev/null 2>&1; then
  echo "[setup] installing uv (fast installer) for $PY"
  "$PY" -m pip install -q uv 2> >(grep -v "is ignored: it is neither" >&2)
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m uv venv -q --seed "$VENV" --python "$PY"
fi
if [ -z "${UV_FIND_LINKS:-}" ]; then
  links="$("$PY" -m pip config get global.find-links 2>/dev/null || true)"
  [ -n "$links" ] && export UV_FIND_LINKS="$links"
fi
stamp="$VENV/.lock.sha256"
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the pinned lock (requirements.lock) into $VENV ..."
  start=$(date +%s)
  "$PY" -m uv pip install -q --python "$VENV/bin/python" --no-deps -r requirements.lock
  "$PY" -m uv pip install -q --python "$VENV/bin/python" --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c "import torch, sys; v = torch.__version__; sys.exit(0 if '+cu' not in v else 'torch ' + v + ' is a CUDA build; see scripts/setup.sh')"
  echo "$want" > "$stamp"
  echo "[setup] done in $(( $(date +%s) - start )) s"
fi
