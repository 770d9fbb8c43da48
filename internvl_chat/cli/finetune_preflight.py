"""The launchers' check before torchrun starts (train/preflight.py), as a command without torch:

  python -m internvl_chat.cli.finetune_preflight --processes 8 ARGS...   # the entry point's arguments

Prints nothing and exits 0 when the command line can start; else one line a problem and exit status 2."""

import sys

from ..train.preflight import problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    processes = 1
    if argv[:1] == ["--processes"]:
        processes, argv = int(argv[1]), argv[2:]
    if len(argv) == 1 and argv[0].endswith(".json"):  # a whole configuration as one JSON file
        return 0
    found = problems(argv, processes)
    for problem in found:
        print(f"launch_finetune: {problem}", file=sys.stderr)
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())
