#!/usr/bin/env bash
# The README's test command: set up (if needed), lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MPLBACKEND=Agg
ruff check .
ruff format --check .
python -m pytest -q "$@"
