#!/bin/sh
# The README's test command: set up .venv (and .venv-newest) if needed, check lint, format and the import rules,
# run the CPU test suite on the lowest tested transformers (.venv), then the model, remote-code, training-step and
# merge tests on the highest (.venv-newest; requirements.txt states the range), less the compiled blocks' numerics
# (torch's inductor: the same torch in both; that each compiled stack is one graph is checked on both). Extra arguments go to both pytest runs, e.g. `sh tools/test.sh -k tiling -x`.
set -eu
cd "$(dirname "$0")/.."
sh tools/setup_env.sh
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/lint-imports --no-cache --no-logo
.venv/bin/python -m pytest tests "$@"
echo "[test] the same model, remote-code, training-step and merge tests on transformers $(.venv-newest/bin/python -c 'import transformers; print(transformers.__version__)')"
exec .venv-newest/bin/python -m pytest tests/test_model_*.py tests/test_checkpoint_files.py \
    tests/test_tokenizer_and_templates.py tests/test_train_steps.py tests/test_train_fast_modes.py \
    tests/test_merge_lora.py -m "not torch_compile" "$@"
