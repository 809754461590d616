#!/usr/bin/env bash
# Install palmchat with its test extras into ./.venv and run lint, the layering contract, mypy
# and the whole test suite.
# Usage: bash ops/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: the CPU wheel; an unpinned resolve would pull a multi-GB CUDA build
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev,triton]'
ruff check .
ruff format --check .
# the layering contract and the type checker, both configured in pyproject.toml
lint-imports
mypy
python -m pytest -q --durations=15 "$@"
