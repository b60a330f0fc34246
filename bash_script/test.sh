#!/usr/bin/env bash
# Install the project with its test extras into a virtual environment and run the whole suite
# (ruff lint + format check + pytest). VENV picks the environment (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch==2.13.0 is the CPU wheel this workplace serves; on a GPU machine install torch first.
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0" -e ".[test]"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest -q "$@"
