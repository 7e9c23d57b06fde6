#!/usr/bin/env bash
# Create or update .venv from the exact pins in requirements.txt. Idempotent: returns in about a
# second when the venv already matches the lock file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.requirements.sha256"
# Cheap presence check (importing monailabel takes seconds); the full import runs after installing.
CHECK='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "monai", "monailabel")))'
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  echo "install: .venv is up to date"
  exit 0
fi
echo "install: creating .venv from requirements.txt (first time takes about 3-5 minutes, ~8 GB)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV/bin/python" -c "import torch, monai, monailabel" \
  || { echo "install: .venv is broken after pip install" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "install: done"
