#!/bin/sh
# Creates (or updates) the project's virtual environment in .venv: torch, requirements.txt (the library's),
# requirements-test.txt (the test command's tools) and this repository as an editable package (pip install -e .,
# which is what makes `internvl_chat` importable and the internvl-* commands exist).
#   - a machine whose python3 already has a CUDA torch keeps it (venv with system site packages);
#   - otherwise torch is installed first, alone, so that requirements.txt never pulls a CUDA build.
# Idempotent: with nothing to install it returns in a fraction of a second, printing nothing.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "[setup] $PYTHON has a CUDA torch: creating $VENV with system site packages to keep it"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        echo "[setup] creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi

if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    echo "[setup] installing $TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi

# requirements.txt states the tested transformers range; .venv takes its lowest release, and $NEWEST, a second
# environment that sees everything of .venv but its own transformers, takes the highest (the test command runs the
# model, training-step and merge tests there too).
lowest=$(sed -n 's/^transformers>=\([0-9.]*\),<=\([0-9.]*\).*/\1/p' requirements.txt)
highest=$(sed -n 's/^transformers>=\([0-9.]*\),<=\([0-9.]*\).*/\2/p' requirements.txt)
NEWEST=${NEWEST:-$VENV-newest}

stamp="$VENV/.requirements.sha256"
want=$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing requirements.txt and requirements-test.txt (transformers $lowest, the lowest tested)"
    "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-test.txt "transformers==$lowest"
    echo "[setup] installing this repository as an editable package (pip install -e .)"
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    echo "$want" > "$stamp"
    "$VENV/bin/python" -c "from importlib.metadata import version; print('[setup]', ' | '.join(name + ' ' + version(name) for name in ('torch', 'transformers', 'peft', 'deepspeed')))"
fi

newest_stamp="$NEWEST/.requirements.sha256"
if [ ! -f "$newest_stamp" ] || [ "$(cat "$newest_stamp")" != "$want" ]; then
    echo "[setup] creating $NEWEST: .venv's packages with transformers $highest, the highest tested"
    rm -rf "$NEWEST"
    "$VENV/bin/python" -m venv --without-pip "$NEWEST"
    site=$("$NEWEST/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # addsitedir, not a plain path line: .venv's own .pth files (the editable install's among them) take effect too
    base=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "import site; site.addsitedir('$base')" > "$site/base_environment.pth"
    "$VENV/bin/python" -m pip install -q --no-deps --target "$site" "transformers==$highest"
    echo "$want" > "$newest_stamp"
fi
