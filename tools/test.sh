#!/bin/sh
# The README's test command: set up .venv if needed, then run the CPU test suite.
# Extra arguments go to pytest, e.g. `sh tools/test.sh -k tiling -x`.
set -eu
cd "$(dirname "$0")/.."
sh tools/setup_env.sh
exec .venv/bin/python -m pytest tests "$@"
