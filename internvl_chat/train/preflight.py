"""What the launcher checks before torchrun starts: the checkpoint folder, the meta file and the annotation files it
names, the DeepSpeed config, and that every flag is one the fine-tuning entry point knows. A mistake then costs
seconds and one line, not a model load on every GPU and a traceback from each.

  python -m internvl_chat.train.preflight ARGS...      # the entry point's arguments; exit status 2 and one line
"""

import ast
import difflib
import json
import sys
from dataclasses import fields
from pathlib import Path

from ..data.meta import MetaError, load_meta
from ..model.checkpoint_folder import CheckpointError, check_checkpoint_folder
from .step_shape import StepShapeError, grouped_step_shape


class PreflightError(ValueError):
    pass


def flag_values(argv: list[str]) -> dict[str, str]:
    """--name value and --name=value pairs (the last one wins, as in the entry point's parser)."""
    values, index = {}, 0
    while index < len(argv):
        argument = argv[index]
        if argument.startswith("--"):
            name, equals, value = argument[2:].partition("=")
            name = name.replace("-", "_")  # transformers' parser takes --learning-rate for --learning_rate too
            if not equals and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                value, index = argv[index + 1], index + 1
            values[name] = value
        index += 1
    return values


def training_arguments_fields() -> list[tuple[str, str, object]]:
    """(name, annotation, default) of transformers' TrainingArguments, read from its source: importing it would take
    seconds (it imports torch), and this check runs before every launch."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    source = Path(spec.origin).with_name("training_args.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            return [
                (statement.target.id, ast.unparse(statement.annotation), _default(statement.value))
                for statement in node.body
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
            ]
    raise LookupError("no TrainingArguments in transformers/training_args.py")


def _default(value):
    """A field's default when it is a literal (field(default=...) included), else None."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        value = next((keyword.value for keyword in value.keywords if keyword.arg == "default"), None)
    return value.value if isinstance(value, ast.Constant) else None


def known_flags() -> set[str]:
    """Every flag name the entry point's parser takes (transformers' TrainingArguments included); a bool whose
    default is True also as --no_<name>, as transformers' parser adds it."""
    from .arguments import DROPPED_FLAGS, RENAMED_FLAGS, DataTrainingArguments, ModelArguments, RunArguments

    declared = [
        (item.name, str(item.type), item.default)
        for group in (ModelArguments, DataTrainingArguments, RunArguments)
        for item in fields(group)
    ]
    names = set()
    for name, annotation, default in [*declared, *training_arguments_fields()]:
        names.add(name)
        if "bool" in annotation and default is True:
            names.add(f"no_{name}")
    return names | {flag[2:] for flag in (*RENAMED_FLAGS, *DROPPED_FLAGS)}


def check(argv: list[str]) -> None:
    values = flag_values(argv)
    for required in ("model_name_or_path", "meta_path", "output_dir"):
        if not values.get(required):
            raise PreflightError(f"--{required} is required")
    check_checkpoint_folder(values["model_name_or_path"])
    load_meta(values["meta_path"], values.get("data_root") or None)
    if values.get("deepspeed"):
        config = Path(values["deepspeed"])
        if not config.is_file():
            raise PreflightError(f"--deepspeed {config}: no such file (the ZeRO configs are shell/zero_stage*.json)")
        try:
            json.loads(config.read_text())
        except json.JSONDecodeError as error:
            raise PreflightError(f"--deepspeed {config} is not valid JSON: {error}") from error
    if values.get("group_by_image", "false").lower() in ("true", "yes", "t", "y", "1"):
        grouped_step_shape(
            int(values.get("per_device_train_batch_size", 8)), int(values.get("gradient_accumulation_steps", 1))
        )
    known = known_flags()
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise PreflightError(f"--{name} is not a flag of the fine-tuning entry point{hint}")


def main(argv: list[str]) -> int:
    if len(argv) == 1 and argv[0].endswith(".json"):  # a whole configuration as one JSON file
        return 0
    try:
        check(argv)
    except (PreflightError, CheckpointError, MetaError, StepShapeError) as error:
        print(f"launch_finetune: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
