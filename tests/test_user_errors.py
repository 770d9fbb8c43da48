"""Mistakes a user can make, as a user makes them (the real commands), and what each one prints: one line that names
the file or value and the fix, a non-zero exit status, no traceback, and nothing written. Checked before torchrun
starts where the mistake can be seen then (seconds, not a model load per process).

| mistake | command | the message says |
|---|---|---|
| checkpoint folder missing | evaluate.sh, launcher | ... does not exist; download it with tools/download_model.sh ... |
| checkpoint without weights | evaluate.sh, launcher | ... has no weights (...); the download is incomplete |
| test set not prepared | evaluate.sh | ... the Karpathy test json does not exist: run tools/prepare_coco.sh ... |
| a test picture missing | evaluate.sh | N of the M coco test pictures are missing, the first ... |
| GPUS not a number | evaluate.sh, launcher | GPUS must be a positive whole number, got 'two' |
| batch that does not divide | launcher | BATCH_SIZE=5 is not a multiple of ... |
| meta file missing | launcher | meta file ... does not exist |
| annotation file missing | launcher | dataset ...: annotation ... does not exist (run tools/prepare_coco.sh ...) |
| a misspelt flag | launcher | --max_stepz is not a flag ... (did you mean --max_steps?) |
| DeepSpeed config missing | launcher | --deepspeed ...: no such file |
| bad lines, --strict_data | launcher (in the processes) | ...: 1 of 6 lines cannot be used: line 2 (not valid JSON |
| results file not JSON | tools/score_captions.py | results file ... is not valid JSON |
| results of the wrong shape | tools/score_captions.py | entry 0 is ...; each entry must be {"image_id": ...} |
| ground truth of the wrong format | tools/score_captions.py | ground truth ... must be COCO caption format ... |
| merge into a folder in use | tools/merge_lora.py | ... exists and is not empty; pass --force to write into it |
| merge of a plain checkpoint | tools/merge_lora.py | ... there is no LoRA to merge ... |
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_chat.data.formats import ANNOTATIONS_FOLDER, KARPATHY_TEST_GT_JSON, KARPATHY_TEST_JSON

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "shell/internvl2.0/2nd_finetune/internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora_coco.sh"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from internvl_chat.devkit.checkpoint import build_checkpoint
    from internvl_chat.devkit.coco import make_synthetic_coco

    root = tmp_path_factory.mktemp("mistakes")
    build_checkpoint(root / "model", seed=0, image_size=224)
    make_synthetic_coco(root / "data/coco", train_images=2, test_images=2, seed=0, meta_path=root / "meta.json")
    (root / "no_weights").mkdir()
    shutil.copy(root / "model/config.json", root / "no_weights/config.json")
    return root


def run(command: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("GPUS", "MASTER_PORT")}
    return subprocess.run(command, cwd=cwd, env={**environment, **env}, capture_output=True, text=True, timeout=300)


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    output = result.stdout + result.stderr  # the launcher keeps its processes' output, both streams, in its log
    assert result.returncode != 0, output
    assert message in output, output
    assert "Traceback" not in output, output


def evaluate(world, checkpoint, *options, **env):
    return run(["sh", str(REPO / "evaluate.sh"), checkpoint, "caption-coco", "--dynamic", *options], world, **env)


def launch(world, *flags, output="run", **env):
    settings = dict(
        GPUS="1",
        BATCH_SIZE="4",
        PER_DEVICE_BATCH_SIZE="2",
        MODEL=str(world / "model"),
        META_PATH=str(world / "meta.json"),
        OUTPUT_DIR=str(world / output),
    )
    return run(["sh", str(LAUNCHER), "--max_steps", "1", *flags], world, **{**settings, **env})


def test_evaluation_refuses_what_it_cannot_use(world, tmp_path):
    assert_refused(
        evaluate(world, "nowhere"),
        "evaluate_caption: checkpoint folder nowhere does not exist; download it with tools/download_model.sh",
    )
    assert_refused(evaluate(world, "no_weights"), "no_weights has no weights (model.safetensors")
    assert_refused(
        evaluate(world, "model", "--data-root", str(tmp_path)),
        f"{KARPATHY_TEST_JSON} does not exist: run tools/prepare_coco.sh",
    )
    assert_refused(evaluate(world, "model", GPUS="two"), "evaluate.sh: GPUS must be a positive whole number, got 'two'")
    gone = next((world / "data/coco/val2014").glob("*.jpg"))
    gone.rename(tmp_path / gone.name)
    try:
        assert_refused(
            evaluate(world, "model"),
            f"1 of the 2 coco test pictures are missing, the first data/coco/val2014/{gone.name}; run "
            "tools/prepare_coco.sh",
        )
    finally:
        (tmp_path / gone.name).rename(gone)
    assert not (world / "results").exists()  # nothing written


def test_the_launcher_refuses_before_torchrun_starts(world, tmp_path):
    assert_refused(launch(world, MODEL=str(world / "nowhere")), "launch_finetune: checkpoint folder")
    assert_refused(launch(world, MODEL=str(world / "no_weights")), "has no weights")
    assert_refused(launch(world, GPUS="two"), "launch_finetune: GPUS must be a positive whole number, got 'two'")
    assert_refused(
        launch(world, BATCH_SIZE="5"),
        "launch_finetune: BATCH_SIZE=5 is not a multiple of PER_DEVICE_BATCH_SIZE x GPUS x NNODES = 2",
    )
    assert_refused(
        launch(world, META_PATH=str(tmp_path / "meta.json")),
        f"launch_finetune: meta file {tmp_path / 'meta.json'} does not exist",
    )
    meta = json.loads((world / "meta.json").read_text())
    entry = next(iter(meta.values()))
    entry["annotation"] = str(tmp_path / "gone.jsonl")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert_refused(
        launch(world, META_PATH=str(tmp_path / "meta.json")),
        f"annotation {tmp_path / 'gone.jsonl'} does not exist (run tools/prepare_coco.sh",
    )
    assert_refused(
        launch(world, "--max_stepz", "3"),
        "launch_finetune: --max_stepz is not a flag of the fine-tuning entry point (did you mean --max_steps?)",
    )
    assert_refused(
        launch(world, "--deepspeed", str(tmp_path / "zero.json")),
        f"launch_finetune: --deepspeed {tmp_path / 'zero.json'}: no such file",
    )
    assert_refused(
        launch(world, "--group_by_image", "True", BATCH_SIZE="4"),
        "launch_finetune: --group_by_image True needs at least 8 captions a step on each process (whole pictures "
        "have 5 to 7 captions), but BATCH_SIZE gives 2 x 2 = 4",
    )
    assert not (world / "run").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_bad_line_in_strict_mode_stops_the_processes_with_one_line(world, tmp_path):
    """Found inside the processes, once the dataset is built: each says it in one line, torchrun's own traceback
    is left out, and the launcher's last line says that training stopped and where the log is."""
    meta = json.loads((world / "meta.json").read_text())
    entry = next(iter(meta.values()))
    lines = Path(entry["annotation"]).read_text().splitlines()
    annotation = tmp_path / "train.jsonl"
    annotation.write_text("\n".join([lines[0], "{not json", *lines[1:5]]) + "\n")
    entry["annotation"] = str(annotation)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    result = launch(world, "--strict_data", "True", output="strict", GPUS="2", META_PATH=str(tmp_path / "meta.json"))
    assert_refused(result, f"{annotation}: 1 of 6 lines cannot be used: line 2 (not valid JSON")
    output = result.stdout + result.stderr
    assert "leave out --strict_data to skip them" in output and "Loading InternVLChatModel" not in output
    assert result.stderr.strip().splitlines()[-1] == (
        f"launch_finetune: training stopped (exit status 2); the log is {world / 'strict/training_log.txt'}"
    )
    assert "ChildFailedError" not in output


def test_scoring_refuses_results_it_cannot_read(world, tmp_path):
    gt = world / "data/coco" / ANNOTATIONS_FOLDER / KARPATHY_TEST_GT_JSON
    score = [sys.executable, str(REPO / "tools/score_captions.py")]
    (tmp_path / "broken.json").write_text('[{"image_id": 1, "caption": ')
    assert_refused(
        run([*score, str(tmp_path / "broken.json"), str(gt)], tmp_path),
        f"score_captions: results file {tmp_path / 'broken.json'} is not valid JSON",
    )
    (tmp_path / "shape.json").write_text(json.dumps([{"image": "a.jpg", "text": "a cat"}]))
    assert_refused(
        run([*score, str(tmp_path / "shape.json"), str(gt)], tmp_path),
        'entry 0 is {"image": "a.jpg", "text": "a cat"}; each entry must be {"image_id": <int>, "caption": <text>}',
    )
    (tmp_path / "dict.json").write_text(json.dumps({"1": "a cat"}))
    assert_refused(run([*score, str(tmp_path / "dict.json"), str(gt)], tmp_path), "not a dict")
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": 1, "caption": "a cat"}]))
    assert_refused(
        run([*score, str(tmp_path / "results.json"), str(tmp_path / "results.json")], tmp_path),
        "must be COCO caption format",
    )
    assert_refused(run([*score, str(tmp_path / "missing.json"), str(gt)], tmp_path), "missing.json does not exist")


def test_merge_refuses_to_overwrite_or_to_merge_nothing(world, tmp_path):
    merge = [sys.executable, str(REPO / "tools/merge_lora.py")]
    assert_refused(run([*merge, str(world / "model"), str(tmp_path / "out")], tmp_path), "there is no LoRA to merge")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    lora = tmp_path / "lora"
    shutil.copytree(world / "model", lora)
    config = json.loads((lora / "config.json").read_text())
    (lora / "config.json").write_text(json.dumps({**config, "use_llm_lora": 8}))
    assert_refused(
        run([*merge, str(lora), str(occupied)], tmp_path),
        "occupied exists and is not empty; pass --force to write into it",
    )
    assert (occupied / "keep.txt").read_text() == "precious"


def test_the_launchers_flag_check_knows_what_the_parser_takes():
    """The check before torchrun reads TrainingArguments' fields from transformers' source (importing it takes
    seconds): it must know exactly the flags the entry point's parser accepts."""
    from internvl_chat.train.arguments import CHECKPOINT_FACT_FLAGS, IGNORED_FLAGS, RENAMED_FLAGS, build_parser
    from internvl_chat.train.preflight import known_flags

    accepted = {
        option[2:].replace("-", "_")  # --learning-rate spells --learning_rate too
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    tutorial_flags = {flag[2:] for flag in (*RENAMED_FLAGS, *IGNORED_FLAGS, *CHECKPOINT_FACT_FLAGS)}
    assert known_flags() == accepted | tutorial_flags


def test_gpus_beyond_the_machine_stops_the_launcher(world, tmp_path):
    """The GPU count comes from nvidia-smi (here a stand-in listing two GPUs), without starting python."""
    smi = tmp_path / "bin/nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: a)'\necho 'GPU 1: NVIDIA H200 (UUID: b)'\n")
    smi.chmod(0o755)
    path = f"{smi.parent}:{os.environ['PATH']}"
    assert_refused(
        launch(world, GPUS="4", BATCH_SIZE="8", PATH=path),
        "launch_finetune: GPUS=4 but this machine has 2 GPU(s); set GPUS=2",
    )
    assert_refused(evaluate(world, "model", GPUS="3", PATH=path), "evaluate.sh: GPUS=3 but this machine has 2 GPU(s)")
    hidden = launch(world, GPUS="2", PATH=path, CUDA_VISIBLE_DEVICES="1")
    assert_refused(hidden, "launch_finetune: GPUS=2 but this machine has 1 GPU(s)")
