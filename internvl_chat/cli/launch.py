"""torchrun, as the launchers start it, with torchrun's own failure report replaced by one line.

  python -m internvl_chat.cli.launch --nproc_per_node=2 internvl_chat/cli/finetune.py ARGS...

Takes torchrun's arguments and runs torchrun's own `run`. When a process fails, that process has already said why
(a user error as one line, a bug as its traceback); torchrun would then add its own traceback and a
ChildFailedError report, about forty lines that bury the reason. Here they become one line naming the rank and how
it ended, and the exit status is that process's.
"""

import logging
import os
import signal
import sys


def failure_line(rank: int, exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        hint = " (SIGKILL: often the machine's memory running out)" if exitcode == -signal.SIGKILL else ""
        return f"process {rank} was killed by {name}{hint}"
    return f"process {rank} stopped with exit status {exitcode}; the lines above say why"


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ and args.nproc_per_node not in ("1", 1):
        os.environ["OMP_NUM_THREADS"] = "1"  # what torchrun sets, without its warning banner
    for name in ("torch.distributed.run", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(f"[launch] {failure_line(rank, failure.exitcode)}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
