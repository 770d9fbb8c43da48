"""What the launcher checks before torchrun starts: the checkpoint folder, the meta file and the annotation files it
names, the DeepSpeed config, the step's shape, and that every flag is one the fine-tuning entry point knows. Every
problem is found at once and named in a line of its own, the checkpoint's first, so a command line costs seconds
and one correction, not a model load on every GPU and a traceback from each (internvl_chat/cli/finetune_preflight.py
prints them)."""

import ast
import difflib
import json
from dataclasses import fields
from pathlib import Path

from ..checkpoint.folder import CheckpointError, check_checkpoint_folder
from ..data.formats import MetaError, load_meta
from .step_shape import StepShapeError, decide_step_shape


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
    from .arguments import (
        CHECKPOINT_FACT_FLAGS,
        IGNORED_FLAGS,
        RENAMED_FLAGS,
        DataTrainingArguments,
        FastModeArguments,
        ModelArguments,
        RunArguments,
    )

    declared = [
        (item.name, str(item.type), item.default)
        for group in (ModelArguments, DataTrainingArguments, FastModeArguments, RunArguments)
        for item in fields(group)
    ]
    names = set()
    for name, annotation, default in [*declared, *training_arguments_fields()]:
        names.add(name)
        if "bool" in annotation and default is True:
            names.add(f"no_{name}")
    return names | {flag[2:] for flag in (*RENAMED_FLAGS, *IGNORED_FLAGS, *CHECKPOINT_FACT_FLAGS)}


def is_true(value: str | None) -> bool:
    return (value or "false").lower() in ("true", "yes", "t", "y", "1")


def problems(argv: list[str], processes: int = 1) -> list[str]:
    """Every problem of the entry point's command line that can be found without torch, the checkpoint's first."""
    from .arguments import checkpoint_fact_problems, split_tutorial_flags

    values = flag_values(argv)
    found = [
        f"--{name} is required" for name in ("model_name_or_path", "meta_path", "output_dir") if not values.get(name)
    ]
    if values.get("model_name_or_path"):
        try:
            folder = check_checkpoint_folder(values["model_name_or_path"])
            facts = split_tutorial_flags(argv)[1]
            found += checkpoint_fact_problems(
                facts, json.loads((folder / "config.json").read_text()), folder / "config.json"
            )
        except CheckpointError as error:
            found.append(str(error))
    if values.get("meta_path"):
        try:
            load_meta(values["meta_path"], values.get("data_root") or None)
        except MetaError as error:
            found.append(str(error))
    if values.get("deepspeed"):
        config = Path(values["deepspeed"])
        if not config.is_file():
            found.append(f"--deepspeed {config}: no such file (the ZeRO configs are shell/zero_stage*.json)")
        else:
            try:
                json.loads(config.read_text())
            except json.JSONDecodeError as error:
                found.append(f"--deepspeed {config} is not valid JSON: {error}")
    try:
        decide_step_shape(
            int(values.get("per_device_train_batch_size", 8)),
            processes,
            is_true(values.get("group_by_image")),
            global_batch_size=int(values["global_batch_size"]) if values.get("global_batch_size") else None,
            accumulation=int(values.get("gradient_accumulation_steps", 1)),
        )
    except StepShapeError as error:
        found.append(str(error))
    except ValueError as error:
        found.append(f"a batch size flag is not a whole number ({error})")
    known = known_flags()
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            found.append(f"--{name} is not a flag of the fine-tuning entry point{hint}")
    return found
