"""Where a training step's time goes: torch.profiler over a few optimizer steps of a real run (--profile_steps), and
the summary that tools/gpu/profile_train_step.py prints for the benchmark's steps."""
import logging
import time
from pathlib import Path

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
    """Wall and kernel time per step, kernel launches per step and the operators and kernels taking most time
    (by GPU time where there is a GPU, else by CPU time)."""
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    lines = [f"{wall_seconds / steps * 1e3:.1f} ms wall per step over {steps} step(s)"]
    if device_events:
        busy = sum(e.device_time_total for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / steps
        lines[0] += (f", {busy:.1f} ms of kernels per step, {len(device_events) / steps:.0f} kernel launches "
                     f"per step, {torch.cuda.memory_stats()['num_alloc_retries']} allocator retries since the start")
    sort_by = "cuda_time_total" if device_events else "cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=90))
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
            self._profiler = profile(activities=profiler_activities())
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
        logger.info("Profile of steps %d-%d written to %s (%s)", self.first, self.last, self.path,
                    summary.splitlines()[0])

    def on_train_end(self, args, state, control, **kwargs):
        if self._profiler is not None:  # the run ended before the last profiled step
            self._profiler.__exit__(None, None, None)
            self._profiler = None
            logger.warning("--profile_steps %d,%d: the run ended at step %d before the last profiled step; "
                           "nothing written", self.first, self.last, state.global_step)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
