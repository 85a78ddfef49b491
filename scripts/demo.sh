#!/usr/bin/env bash
# The README's main command: set up (if needed) and run the short end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
multispin demo "$@"
