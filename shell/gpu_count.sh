# Sourced by evaluate.sh and launch_finetune.sh: sets gpu_count to the GPUs this process may use, without starting
# python and torch (two seconds): nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES; with no NVIDIA device file,
# none; and torch's own count only where there are devices but no nvidia-smi.
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && [ -z "$CUDA_VISIBLE_DEVICES" ]; then
    gpu_count=0
elif command -v nvidia-smi >/dev/null 2>&1; then
    gpu_count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        visible=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
        [ "$visible" -lt "$gpu_count" ] && gpu_count=$visible
    fi
elif ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    gpu_count=0
else
    gpu_count=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
