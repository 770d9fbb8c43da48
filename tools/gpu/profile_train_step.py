#!/usr/bin/env python3
"""Where a training step's GPU time goes: torch.profiler over a few steps of one benchmark_train mode.

  python tools/gpu/profile_train_step.py --like InternVL2-2B --mode fast

Prints the wall time per step without the profiler, on first sight of the timed batches and on a second pass over
them (every shape seen: compiled graphs and cuDNN plans cached), then under the profiler the GPU-busy time per step
and the kernels taking most of it, grouped by name, and last the places in one step where the host waits for the
GPU (each such wait empties the GPU's queue, so host time after it is not hidden behind kernels).
"""

import argparse
import tempfile
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import profile

from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.devkit.train_benchmark import device_steps, parse_mode, prepare_data, set_up, train_step
from internvl_chat.train.profiling import profile_summary, profiler_activities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a checkpoint folder")
    source.add_argument("--like", help="build a random full-size checkpoint of this size first")
    parser.add_argument("--mode", default="fast", help="a tools/benchmark_train.py mode")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4, help="captions a micro-batch")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches a step (per caption)")
    args = parser.parse_args()
    flags = parse_mode(args.mode)
    options = SimpleNamespace(
        model=args.model,
        like=args.like,
        device="cuda",
        batch=args.batch,
        accumulation=args.accumulation,
        steps=args.steps,
        warmup=args.warmup,
        lora_dropout=0.05,
        same_captions=False,
        coco_sizes=False,
        attn_implementation=None,
        lr=4e-5,
    )
    device = torch.device("cuda")
    work = Path(tempfile.mkdtemp())
    model_dir = (
        Path(args.model)
        if args.model
        else build_checkpoint(work / args.like, like=args.like, dtype=torch.bfloat16, device="cuda")
    )
    steps = prepare_data(options, model_dir, work)
    model, layout, optimizer = set_up(model_dir, flags, options, device)
    batches = device_steps(layout, steps["grouped" if layout.group_by_image else "per_caption"], device)
    step = partial(train_step, model, layout, optimizer=optimizer, device=device)
    for batch in batches[: args.warmup]:
        step(batch)
    torch.cuda.synchronize()
    timed = batches[args.warmup : args.warmup + args.steps]
    first_sight, second_pass = (seconds_per_step(step, timed) for _ in range(2))
    print(
        f"{args.mode}: {first_sight * 1e3:.1f} ms a step on first sight of {len(timed)} batches, "
        f"{second_pass * 1e3:.1f} ms on a second pass over them (no profiler)"
    )
    with profile(activities=profiler_activities(), record_shapes=True) as prof:
        start = time.perf_counter()
        for batch in timed:
            step(batch)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    print(f"{args.mode}: {profile_summary(prof, len(timed), wall, top=args.top)}")
    sites = synchronizing_lines(step, timed[-1])
    print(f"{sum(sites.values())} host-GPU synchronizations in one step, by source line:")
    for site, count in sites.most_common():
        print(f"  {count} x {site}")


def seconds_per_step(step, batches) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def synchronizing_lines(step, batch) -> Counter:
    """One training step under CUDA's sync debug mode, which warns at every operation that waits for the GPU;
    the warning carries the Python line that called the operation."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(batch)
            torch.cuda.set_sync_debug_mode(0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


if __name__ == "__main__":
    main()
