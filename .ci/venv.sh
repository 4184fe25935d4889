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
# a venv shared between checkouts (TILESEG_VENV) must import this checkout's tileseg
WHERE="$(cd / && "$VENV/bin/python" -c 'import os, tileseg; print(os.path.dirname(os.path.dirname(os.path.realpath(tileseg.__file__))))' 2>/dev/null || true)"
if [ "$WHERE" != "$(cd "$ROOT" && pwd -P)" ]; then
  echo "[tileseg] $VENV imported tileseg from ${WHERE:-nowhere}: installing this checkout ($ROOT) in editable mode" >&2
  "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
