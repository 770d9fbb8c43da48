"""What a training run prints: the main process's lines a person wants (the tutorial's summary of the run, one
line a logging step, warnings once), the other processes' errors only. With --verbose True, everything that
transformers and DeepSpeed log as well (DeepSpeed's configuration and its per-step wall-clock breakdown)."""

import contextlib
import datetime
import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("internvl_chat.train")
# transformers' lines that tell a user of this recipe nothing (silenced unless --verbose True)
NOISE = (
    "max_steps is given, it will override",  # the launcher passes --num_train_epochs; --max_steps wins, as asked
    "Do not forget to share your model",
    "mtime may not be reliable",  # how transformers orders checkpoints to rotate them
    # the Trainer copies the tokenizer's special tokens into the top-level config; the LLM's own config has them
    "The tokenizer has new PAD/BOS/EOS tokens",
)


class DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in NOISE)


def setup_logging(main_process: bool, verbose: bool) -> None:
    import transformers

    handler = logging.StreamHandler(sys.stdout)
    if not verbose:
        handler.addFilter(DropNoise())
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%m/%d %H:%M:%S", handlers=[handler], force=True
    )
    quiet = logging.ERROR if not main_process else logging.INFO if verbose else logging.WARNING
    logging.getLogger("internvl_chat").setLevel(logging.INFO if main_process else logging.ERROR)
    transformers.utils.logging.set_verbosity(quiet)
    transformers.utils.logging.disable_default_handler()  # through the root handler above, in one format
    transformers.utils.logging.enable_propagation()
    # the tutorial's "***** Running training *****, Num examples = ..., Total optimization steps = ..." block
    logging.getLogger("transformers.trainer").setLevel(logging.INFO if main_process else logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(quiet)
    # "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has N. Using
    # DeepSpeed's value": DeepSpeed's value is the one the launcher set.
    logging.getLogger("accelerate.accelerator").setLevel(logging.ERROR if not verbose else logging.INFO)
    # DeepSpeed's gloo path (CPU runs) calls a collective torch deprecated, in every process at every step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)
    if not main_process and not verbose:
        sys.stdout = open(os.devnull, "w")  # each process would print PEFT's parameter line and the like again
        transformers.utils.logging.disable_progress_bar()  # and its own loading and saving bars


def extensions_root() -> Path:
    """Where torch keeps the ops it builds (the launcher sets TORCH_EXTENSIONS_DIR to the repository's .cache)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def deepspeed_ops_to_build(use_cpu: bool) -> list[str]:
    """DeepSpeed's ops that this run will compile before its first step because no earlier run has: on a GPU its
    fused Adam; on the CPU its shared-memory collectives (the optimizer there is PyTorch's AdamW, see
    InternVLTrainer.create_accelerator_and_postprocess)."""
    names = ["deepspeed_shm_comm"] if use_cpu else ["fused_adam"]
    root = extensions_root()
    return [name for name in names if not any(root.glob(f"**/{name}/*.so"))]


def announce_deepspeed_build(training_args) -> None:
    if not training_args.deepspeed or not training_args.should_log:
        return
    missing = deepspeed_ops_to_build(training_args.use_cpu)
    if missing:
        logger.info(
            "DeepSpeed builds its %s op(s) before the first step: once, a minute or two; later runs reuse them from %s",
            " and ".join(missing),
            extensions_root(),
        )


@contextlib.contextmanager
def quiet_stdout(verbose: bool):
    """DeepSpeed prints a line from every process when it loads an op ("... built successfully")."""
    if verbose:
        yield
        return
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        yield


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class StepLine(TrainerCallback):
    """One line a logging step on the main process, in place of transformers' dict or progress bar:

    step 12/186 (6%) | loss 4.8570 | lr 1.50e-03 | grad norm 8.73 | 24.8 captions/s | 3,120 tokens/s |
    0.01 TFLOP/s | MFU 0.43 | 24.2 GB | 0:00:14 elapsed, ETA 0:03:25
    """

    def __init__(self, write=print):
        self.write = write
        self.started, self.first_step = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" not in logs:  # the run's summary: the entry point prints it as the tutorial's "train metrics"
            return
        parts = [
            f"step {state.global_step}/{state.max_steps} ({state.global_step / max(state.max_steps, 1):.0%})",
            f"loss {logs['loss']:.4f}",
        ]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"grad norm {logs['grad_norm']:.3g}")
        if "samples_per_second" in logs:
            parts.append(f"{logs['samples_per_second']:.1f} captions/s")
        if "tokens_per_second" in logs:
            parts.append(f"{logs['tokens_per_second']:,.0f} tokens/s")
        if "tflops_per_device" in logs:
            parts.append(f"{logs['tflops_per_device']:.3g} TFLOP/s")
        if "mfu" in logs:
            parts.append(f"MFU {logs['mfu']:.2f}")
        if "max_memory_allocated_gb" in logs:
            parts.append(f"{logs['max_memory_allocated_gb']:.1f} GB")
        if self.started is not None:
            elapsed = time.perf_counter() - self.started
            done = state.global_step - self.first_step
            remaining = elapsed / done * (state.max_steps - state.global_step) if done else 0
            parts.append(f"{duration(elapsed)} elapsed, ETA {duration(remaining)}")
        self.write(" | ".join(parts))
