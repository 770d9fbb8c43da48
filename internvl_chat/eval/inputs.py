"""What an evaluation needs before a model is loaded, checked without torch in well under a second: evaluate.sh runs
these checks before any process starts (internvl_chat/cli/evaluate_arguments.py), and every process again."""

import os

from ..checkpoint.folder import CheckpointError, check_checkpoint_folder
from .caption_sets import CAPTION_SETS, read_entries
from .scoring import ScoringError, require_java


def check_inputs(checkpoint: str, datasets: list[str], data_root: str | None = None, scoring: bool = True) -> list[str]:
    """Every problem found, one message each, in the order of the command line: the checkpoint folder, each test
    set's files and pictures, then Java (needed by scoring, checked before hours of generation, not after). An
    empty list: nothing stands in the way."""
    problems = []
    try:
        check_checkpoint_folder(checkpoint)
    except CheckpointError as error:
        problems.append(str(error))
    for name in datasets:
        if name not in CAPTION_SETS:
            problems.append(f"unknown dataset {name!r}; choose from {', '.join(CAPTION_SETS)}")
            continue
        try:
            entries, _ = read_entries(CAPTION_SETS[name], data_root)
        except FileNotFoundError as error:
            problems.append(str(error))
            continue
        missing = [entry["image"] for entry in entries if not os.path.isfile(entry["image"])]
        if missing:
            problems.append(
                f"{len(missing)} of the {len(entries)} {name} test pictures are missing, the first {missing[0]}; "
                "run tools/prepare_coco.sh (it resumes), or check --data-root"
            )
    if scoring:
        try:
            require_java()
        except ScoringError as error:
            problems.append(str(error))
    return problems


def user_error_line(error: Exception) -> str:
    """The message of an error a user caused; one raised in a loader worker carries the worker's traceback as
    text, of which its last line is the message."""
    return str(error).strip().splitlines()[-1] if "Original Traceback" in str(error) else str(error)
