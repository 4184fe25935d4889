#!/usr/bin/env bash
# The test command (README quick start and CI): set up .venv, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
python -m pytest -q "$@"
