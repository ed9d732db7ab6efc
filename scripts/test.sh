#!/usr/bin/env bash
# The test command: set up (or reuse) the virtual environment, then run the test suite
# on the smoke profile through the real stack (Prefect test server, local Ray, DVC, MLflow
# on SQLite, moto's S3 server on 127.0.0.1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
