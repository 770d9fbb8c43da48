#!/bin/sh
# Download an original InternVL2 checkpoint into pretrained/<name>, as the tutorial does:
#   tools/download_model.sh InternVL2-2B        (also: 1B 4B 8B 26B 40B Llama3-76B, or a full repo id)
# Wraps `hf download OpenGVLab/<name> --local-dir pretrained/<name>` (resumable). Environment: HF_ENDPOINT,
# HF_TOKEN as usual for the hub client; PRETRAINED_DIR [pretrained]; HF [.venv's hf, else PATH's].
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: tools/download_model.sh InternVL2-2B|InternVL2-1B|...|OpenGVLab/<repo>" >&2; exit 2; }
case "$1" in
    */*) repo_id=$1 ;;
    InternVL2-76B) repo_id=OpenGVLab/InternVL2-Llama3-76B ;;
    *) repo_id=OpenGVLab/$1 ;;
esac
name=${repo_id#*/}
target=${PRETRAINED_DIR:-pretrained}/$name
if [ -x "$repo/.venv/bin/hf" ]; then bin="$repo/.venv/bin/"; else bin=""; fi
HF=${HF:-${bin}hf}
PYTHON=${PYTHON:-${bin}python3}
command -v "$HF" >/dev/null 2>&1 || { echo "download_model: the 'hf' command (huggingface_hub) is missing: run sh tools/setup_env.sh" >&2; exit 2; }

echo "[download_model] $repo_id -> $target"
if ! "$HF" download "$repo_id" --local-dir "$target"; then
    cat >&2 <<MSG
download_model: could not download $repo_id from the Hugging Face Hub.
  - Check the network (or set HF_ENDPOINT to a mirror you can reach) and run the same command again: it resumes.
  - Without a network, copy a downloaded pretrained/$name folder here, or build a tiny stand-in:
      python tools/make_tiny_model.py pretrained/InternVL2-tiny
MSG
    exit 1
fi
"$PYTHON" -c "
import sys
from internvl_chat.checkpoint.loader import check_checkpoint_folder
check_checkpoint_folder('$target'); print('[download_model] $target is a complete InternVL2 checkpoint')
" 2>/dev/null || echo "[download_model] downloaded to $target (not checked: run with the project's python to verify)"
