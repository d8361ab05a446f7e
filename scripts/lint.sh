#!/usr/bin/env bash
# The static gate CI runs before the tests: lint, formatting, types, import layers.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
python scripts/lint_imports.py
