#!/usr/bin/env python3
"""What a sequence length that the process has not seen before costs in SDPA's kernels, forward + backward.

  python tools/gpu/attention_shapes_check.py                      # cuDNN, flash, and cuDNN without per-length plans
  python tools/gpu/attention_shapes_check.py --lengths 1830:1870 --backends cudnn

Per-caption batches are padded to their longest sample, so their length changes from micro-batch to micro-batch
(COCO's captions differ by a few tokens). cuDNN builds an execution plan for each new shape; this script times the
first causal forward + backward at each length against the same call again, for InternVL2-2B's LLM attention
(16 query heads, 8 key/value heads, head size 128, the [batch, length, heads, dim] layout transposed, as the model
calls it). `cudnn_one_plan` runs cuDNN in a child process with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, which PyTorch reads
once and which makes cuDNN take lengths through its ragged path instead of a plan per length.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
ONE_PLAN_ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"


def parse_lengths(text: str) -> list[int]:
    if ":" in text:
        first, last = (int(part) for part in text.split(":"))
        return list(range(first, last + 1))
    return [int(part) for part in text.split(",")]


def timed_call(q, k, v, grad, backend) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with sdpa_kernel([backend]):
        out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(backend_name: str, lengths: list[int], batch: int, heads: int, kv_heads: int, dim: int) -> dict:
    backend = BACKENDS[backend_name]
    device = torch.device("cuda")

    def inputs(length):
        def tensor(h):  # [batch, length, heads, dim] in memory, [batch, heads, length, dim] as a view
            return torch.randn(batch, length, h, dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
        q, k, v = (tensor(h).requires_grad_() for h in (heads, kv_heads, kv_heads))
        return q, k, v, torch.randn_like(q)

    timed_call(*inputs(64), backend)  # the library's own first-use costs, not a length's
    first, again = [], []
    for length in lengths:
        tensors = inputs(length)
        first.append(timed_call(*tensors, backend))
        again.append(timed_call(*tensors, backend))
    return {"backend": backend_name, "lengths": len(lengths), "first_ms": statistics.median(first),
            "again_ms": statistics.median(again), "extra_ms_total": sum(f - a for f, a in zip(first, again))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1830:1869", help="FIRST:LAST or a comma-separated list")
    parser.add_argument("--backends", default="cudnn,flash,cudnn_one_plan")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = parse_lengths(args.lengths)
    rows = []
    for name in args.backends.split(","):
        if name == "cudnn_one_plan" and not args.child:
            command = [sys.executable, __file__, "--child", "--backends", "cudnn", "--lengths", args.lengths,
                       "--batch", str(args.batch), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
                       "--dim", str(args.dim)]
            result = subprocess.run(command, env={**os.environ, ONE_PLAN_ENV: "1"}, capture_output=True, text=True)
            if result.returncode:
                print(f"cudnn_one_plan failed:\n{result.stderr[-2000:]}")
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append({**row, "backend": "cudnn_one_plan"})
            continue
        try:
            rows.append(measure(name, lengths, args.batch, args.heads, args.kv_heads, args.dim))
        except RuntimeError as error:  # a backend that does not take this shape on this card
            print(f"{name}: {str(error).splitlines()[0]}")
    if args.child:
        print(json.dumps(rows[0]))
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"causal bf16 [{args.batch}, {args.heads} ({args.kv_heads} kv), L, {args.dim}], "
          f"L = {lengths[0]}..{lengths[-1]} ({len(lengths)} lengths), forward + backward")
    print("| backend | first call at a new length, median ms | same call again, median ms | "
          "extra over all lengths, ms |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['first_ms']:.2f} | {row['again_ms']:.2f} | {row['extra_ms_total']:.0f} |")


if __name__ == "__main__":
    main()
