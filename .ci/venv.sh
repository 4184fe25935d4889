# Sourced by examples/quickstart.sh, tests/run.sh and .ci/run: creates .venv
# (once per pyproject.toml change) with tileseg installed in editable mode.
# TILESEG_EXTRAS picks the extras (default: dev = everything + test tools).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TILESEG_VENV:-$ROOT/.venv}"
EXTRAS="${TILESEG_EXTRAS:-dev}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[tileseg] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.tileseg-installed-$EXTRAS-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[tileseg] installing tileseg[$EXTRAS] (first run takes a few minutes: torch is large)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]"
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
