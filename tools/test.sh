#!/bin/sh
# The README's test command: set up .venv if needed, check lint, format and the import rules, then run the CPU
# test suite. Extra arguments go to pytest, e.g. `sh tools/test.sh -k tiling -x`.
set -eu
cd "$(dirname "$0")/.."
sh tools/setup_env.sh
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/lint-imports --no-cache --no-logo
exec .venv/bin/python -m pytest tests "$@"
