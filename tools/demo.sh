#!/bin/sh
# The README's first command: set up .venv, then run the whole tutorial on a tiny model and a synthetic COCO
# (tools/demo.py says what each stage does). Results in demo_out/. Extra arguments go to tools/demo.py.
set -eu
cd "$(dirname "$0")/.."
sh tools/setup_env.sh
exec .venv/bin/python tools/demo.py "$@"
