"""Where a training step's time goes: torch.profiler over a few optimizer steps of a real run (--profile_steps), and
the summary that tools/gpu/profile_train_step.py prints for the benchmark's steps."""

import logging
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

logger = logging.getLogger("internvl_chat.train")


def parse_step_range(text: str) -> tuple[int, int]:
    """'FIRST,LAST' (1-based optimizer steps, inclusive) -> (first, last); one number profiles one step."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not 1 <= values[0] <= values[1]:
        raise ValueError(f"--profile_steps {text!r}: expected FIRST,LAST with 1 <= FIRST <= LAST, e.g. 20,22")
    return values[0], values[1]


def profile_summary(prof, steps: int, wall_seconds: float, top: int = 40) -> str:
    """Wall time and GPU busy time per step, kernel launches per step, the operators and kernels taking most time
    (by GPU time where there is a GPU, else by CPU time) and the GPU's idle gaps."""
    # GPU activity: kernels, copies and memsets. Not user annotations: torch.compile marks each compiled graph's
    # span on the GPU timeline too, which would count its kernels twice and cover the gaps between them.
    device_events = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    lines = [f"{wall_seconds / steps * 1e3:.1f} ms wall per step over {steps} step(s)"]
    if device_events:
        busy = busy_time([Span(e.time_range.start, e.time_range.end, e.name) for e in device_events]) / 1e3 / steps
        lines[0] += (
            f", GPU busy {busy:.1f} ms per step, {len(device_events) / steps:.0f} kernel launches "
            f"per step, {torch.cuda.memory_stats()['num_alloc_retries']} allocator retries since the start"
        )
    sort_by = "cuda_time_total" if device_events else "cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=90))
    if device_events:

        def spans(events):  # input shapes where the profiler recorded them (record_shapes=True)
            return [
                Span(
                    e.time_range.start,
                    e.time_range.end,
                    e.name,
                    str([list(s) for s in e.input_shapes if s]) if getattr(e, "input_shapes", None) else "",
                )
                for e in events
            ]

        host_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
        lines.append(idle_report(spans(device_events), spans(host_events), steps))
    return "\n".join(lines)


class Span(NamedTuple):
    start: float  # microseconds
    end: float
    name: str
    shapes: str = ""


def busy_time(kernels: list[Span]) -> float:
    """Microseconds in which at least one of the spans runs (overlapping spans merged)."""
    total, busy_until = 0.0, None
    for kernel in sorted(kernels):
        if busy_until is None or kernel.start >= busy_until:
            total += kernel.end - kernel.start
            busy_until = kernel.end
        elif kernel.end > busy_until:
            total += kernel.end - busy_until
            busy_until = kernel.end
    return total


def idle_report(kernels: list[Span], host_ops: list[Span], steps: int, top: int = 12, min_gap_us: float = 200.0) -> str:
    """Where the GPU waits: the gaps between kernels (overlapping kernels merged), the longest with the kernels on
    either side and the host operators that overlap it most (what the host was busy with meanwhile)."""
    kernels = sorted(kernels)
    gaps, busy_until, previous = [], None, None
    for kernel in kernels:
        if busy_until is not None and kernel.start - busy_until >= min_gap_us:
            gaps.append((kernel.start - busy_until, busy_until, previous, kernel.name))
        if busy_until is None or kernel.end > busy_until:
            busy_until, previous = kernel.end, kernel.name
    total_ms = sum(gap[0] for gap in gaps) / 1e3
    lines = [
        f"GPU idle in gaps of {min_gap_us / 1e3:.1f} ms or more: {total_ms / steps:.1f} ms per step "
        f"({len(gaps) / steps:.0f} gaps per step); the longest:"
    ]
    for length, start, before, after in sorted(gaps, reverse=True)[:top]:
        end = start + length
        overlapping = sorted(
            (op for op in host_ops if op.start < end and op.end > start),
            key=lambda op: min(op.end, end) - max(op.start, start),
            reverse=True,
        )
        names = dict.fromkeys(op.name + (op.shapes[:80] if op.shapes not in ("", "[]") else "") for op in overlapping)
        host = ", ".join(list(names)[:4]) or "-"
        lines.append(f"  {length / 1e3:7.2f} ms after {before[:60]} before {after[:60]}; host: {host[:300]}")
    return "\n".join(lines)


def profiler_activities() -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


class StepProfiler(TrainerCallback):
    """Records optimizer steps first..last of the run with torch.profiler and writes the summary to
    output_dir/profile_steps_FIRST-LAST.txt (main process only: the other ranks run the same steps)."""

    def __init__(self, first: int, last: int, output_dir: str | Path):
        self.first, self.last = first, last
        self.path = Path(output_dir) / f"profile_steps_{first}-{last}.txt"
        self._profiler, self._start = None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first and state.is_world_process_zero:
            synchronize()
            self._profiler = profile(activities=profiler_activities(), record_shapes=True)
            self._profiler.__enter__()
            self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is None or state.global_step != self.last:
            return
        synchronize()
        wall = time.perf_counter() - self._start
        self._profiler.__exit__(None, None, None)
        summary = profile_summary(self._profiler, self.last - self.first + 1, wall)
        self._profiler = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"optimizer steps {self.first}-{self.last}\n{summary}\n")
        logger.info(
            "Profile of steps %d-%d written to %s (%s)", self.first, self.last, self.path, summary.splitlines()[0]
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self._profiler is not None:  # the run ended before the last profiled step
            self._profiler.__exit__(None, None, None)
            self._profiler = None
            logger.warning(
                "--profile_steps %d,%d: the run ended at step %d before the last profiled step; nothing written",
                self.first,
                self.last,
                state.global_step,
            )


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
