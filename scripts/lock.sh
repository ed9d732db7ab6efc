#!/usr/bin/env bash
# Re-resolve requirements.lock from requirements.in (maintainers only).
# uv resolves dvc[s3] + boto3 in seconds where pip backtracks for a long time.
# The CUDA wheels that torch's PyPI metadata names are left out: the project
# runs on CPU and installs the lock with --no-deps (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q uv
python3 -m uv pip compile -q requirements.in -o requirements.lock.tmp --python-version 3.11 \
  --no-header --no-annotate
grep -vE '^(nvidia-|triton==|cuda-)' requirements.lock.tmp > requirements.lock
rm requirements.lock.tmp
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
