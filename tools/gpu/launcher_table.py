#!/usr/bin/env python3
"""The table of launcher runs (tools/gpu/finetune_check.sh) from their trainer_state.json files, or from their
training logs (a run stopped before it wrote trainer_state.json; one logged dict a step, as the launcher logs):
captions/s over the logged steps from --first to --last, leaving out the steps a run profiled (--profile_steps
slows them), as the median of the steps' rates and as the steps' captions over their time (a step's rate is its
captions over its time, and every step has the same captions, so this is the rates' harmonic mean), and the median
time Python's garbage collector took a step.

  python3 tools/gpu/launcher_table.py OUT/per_caption_trainer_state.json OUT/grouped_trainer_state.json \
      --first 3 --skip 16-18
  python3 tools/gpu/launcher_table.py OUT/per_caption_training_log.txt --last 35
"""

import argparse
import ast
import json
import re
import statistics
from pathlib import Path


def parse_steps(text: str) -> set[int]:
    steps = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


def logged_steps(path: Path) -> list[dict]:
    """The logged training steps, each with its step number."""
    if path.suffix == ".json":
        history = json.loads(path.read_text())["log_history"]
    else:  # the Trainer's printed dicts, values as strings ('20.97'); step = place in the log
        history = []
        for text in re.findall(r"\{'loss': .*?\}", path.read_text()):
            entry = {key: float(value) for key, value in ast.literal_eval(text).items()}
            history.append({**entry, "step": len(history) + 1})
    return [entry for entry in history if "samples_per_second" in entry]


def run_row(path: Path, first: int, last: int | None, skip: set[int]) -> dict:
    history = logged_steps(path)
    if not history:
        raise SystemExit(f"{path}: no logged training steps")
    kept = [
        entry for entry in history if first <= entry["step"] <= (last or entry["step"]) and entry["step"] not in skip
    ]
    if not kept:
        raise SystemExit(f"{path}: no logged step from {first} to {last or 'the end'} outside {sorted(skip)}")
    rates = [entry["samples_per_second"] for entry in kept]
    gc_ms = [entry["python_gc_ms"] for entry in kept if "python_gc_ms" in entry]
    name = path.name.removesuffix("_trainer_state.json").removesuffix(".json").removesuffix(".txt")
    name = name.removesuffix("_training_log")
    return {
        "run": name,
        "steps": f"{kept[0]['step']}-{kept[-1]['step']} ({len(kept)})",
        "captions_per_s": statistics.median(rates),
        "low": min(rates),
        "high": max(rates),
        "overall": statistics.harmonic_mean(rates),
        "gc_ms": f"{statistics.median(gc_ms):.1f} (max {max(gc_ms):.1f})" if gc_ms else "-",
        "tflops": statistics.median(entry.get("tflops_per_device", 0.0) for entry in kept),
        "peak_gb": max(entry.get("max_memory_allocated_gb", 0.0) for entry in history),
        "loss": f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "states", nargs="+", type=Path, help="trainer_state.json files (or training logs) of launcher runs"
    )
    parser.add_argument("--first", type=int, default=3, help="first step counted (the first ones compile)")
    parser.add_argument("--last", type=int, default=None, help="last step counted (default: the run's last)")
    parser.add_argument("--skip", default="", help="steps left out, e.g. 16-18 (profiled)")
    parser.add_argument("--baseline", default=None, help="run whose captions/s the ratios divide by")
    args = parser.parse_args()
    rows = [run_row(path, args.first, args.last, parse_steps(args.skip)) for path in args.states]
    baseline = next((row["captions_per_s"] for row in rows if row["run"] == args.baseline), None)
    print(
        "| run | steps (count) | captions/s, median | range | captions/s, all steps | model TFLOP/s | peak GB "
        "| Python GC ms a step | loss, first -> last |" + (" vs " + args.baseline + " |" if baseline else "")
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if baseline else ""))
    for row in rows:
        ratio = f" {row['captions_per_s'] / baseline:.2f}x |" if baseline else ""
        print(
            f"| {row['run']} | {row['steps']} | {row['captions_per_s']:.2f} | {row['low']:.2f}-{row['high']:.2f} "
            f"| {row['overall']:.2f} | {row['tflops']:.1f} | {row['peak_gb']:.1f} | {row['gc_ms']} | {row['loss']} "
            f"|{ratio}"
        )


if __name__ == "__main__":
    main()
