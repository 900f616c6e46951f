#!/usr/bin/env bash
# Create ./.venv (once) and install peftlab into it: torch 2.13.0 (CPU build) first, so the
# project's torch range is already satisfied and pip never pulls a multi-GB CUDA build.
# Skipped when the venv already holds this pyproject.toml's install (an editable install sees
# code changes without reinstalling).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
STAMP=.venv/.peftlab-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import peftlab.cli" 2>/dev/null; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "$WANT" > "$STAMP"
