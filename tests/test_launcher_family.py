"""The InternVL2.0 2nd-finetune launcher family, without training: every shell script parses under dash, the 15
launchers exist under their original names, and each one's command line (captured by a fake torchrun) parses with
the entry point's own parser and carries the original's settings. Also the common core's batch arithmetic and its
errors for bad GPUS / BATCH_SIZE values."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_chat.train.step_shape import decide_step_shape

REPO = Path(__file__).resolve().parents[1]
FAMILY = REPO / "shell/internvl2.0/2nd_finetune"
VENV_PYTHON = REPO / ".venv/bin/python"

STEMS = {
    "1B": "internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune",
    "2B": "internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune",
    "4B": "internvl2_4b_phi3_3_8b_dynamic_res_2nd_finetune",
    "8B": "internvl2_8b_internlm2_7b_dynamic_res_2nd_finetune",
    "26B": "internvl2_26b_internlm2_20b_dynamic_res_2nd_finetune",
    "40B": "internvl2_40b_hermes2_yi_34b_dynamic_res_2nd_finetune",
    "76B": "internvl2_76b_hermes2_llama3_70b_dynamic_res_2nd_finetune",
}
CONV = {
    "1B": "Hermes-2",
    "2B": "internlm2-chat",
    "4B": "phi3-chat",
    "8B": "internlm2-chat",
    "26B": "internlm2-chat",
    "40B": "Hermes-2",
    "76B": "internlm2-chat",
}
MODEL_DIR = {size: f"./pretrained/InternVL2-{size}" for size in STEMS} | {"76B": "./pretrained/InternVL2-Llama3-76B"}

# name -> (size, LoRA rank, ZeRO stage, learning rate, default GPUS per host, NNODES, BATCH_SIZE, PER_DEVICE_BATCH_SIZE)
LAUNCHERS = {
    f"{STEMS['1B']}_full.sh": ("1B", 0, 1, 4e-5, 8, 1, 128, 4),
    f"{STEMS['1B']}_lora.sh": ("1B", 16, 1, 4e-5, 2, 1, 16, 4),
    f"{STEMS['2B']}_full.sh": ("2B", 0, 1, 4e-5, 8, 1, 128, 4),
    f"{STEMS['2B']}_lora.sh": ("2B", 16, 1, 4e-5, 2, 1, 16, 4),
    f"{STEMS['2B']}_lora_coco.sh": ("2B", 128, 1, 4e-5, 8, 1, 512, 4),
    f"{STEMS['4B']}_full.sh": ("4B", 0, 1, 4e-5, 8, 1, 128, 4),
    f"{STEMS['4B']}_lora.sh": ("4B", 16, 1, 4e-5, 2, 1, 16, 4),
    f"{STEMS['8B']}_full.sh": ("8B", 0, 1, 4e-5, 8, 1, 128, 4),
    f"{STEMS['8B']}_lora.sh": ("8B", 16, 1, 4e-5, 2, 1, 16, 4),
    f"{STEMS['26B']}_full.sh": ("26B", 0, 3, 2e-5, 8, 1, 128, 2),
    f"{STEMS['26B']}_lora.sh": ("26B", 16, 3, 2e-5, 2, 1, 16, 2),
    f"{STEMS['40B']}_full.sh": ("40B", 0, 3, 2e-5, 8, 2, 128, 2),
    f"{STEMS['40B']}_lora.sh": ("40B", 16, 3, 2e-5, 2, 1, 16, 2),
    f"{STEMS['76B']}_full.sh": ("76B", 0, 3, 2e-5, 8, 4, 128, 1),
    f"{STEMS['76B']}_lora.sh": ("76B", 16, 3, 2e-5, 8, 1, 16, 1),
}
LAUNCHER_ENV = (
    "GPUS",
    "BATCH_SIZE",
    "PER_DEVICE_BATCH_SIZE",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OUTPUT_DIR",
    "MODEL",
    "META_PATH",
    "DATA_ROOT",
    "TORCHRUN",
    "PYTHON",
)
ENTRY_POINT = "internvl_chat.cli.finetune"


def shell_scripts():
    scripts = sorted((REPO / "shell").rglob("*.sh")) + sorted((REPO / "tools").glob("*.sh"))
    if (REPO / "evaluate.sh").is_file():
        scripts.append(REPO / "evaluate.sh")
    return scripts


@pytest.mark.skipif(shutil.which("dash") is None, reason="dash is not installed")
@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shell_script_parses_under_dash(script):
    result = subprocess.run(["dash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_family_has_the_original_names():
    assert sorted(p.name for p in FAMILY.glob("*.sh")) == sorted(LAUNCHERS)


def test_the_default_meta_file_points_at_the_coco_captions():
    meta = json.loads((REPO / "shell/data/internvl_1_2_finetune_custom.json").read_text())
    assert meta, "the meta file names no dataset"
    for name, entry in meta.items():
        assert entry["root"] and entry["annotation"].endswith(".jsonl"), name
    assert meta == json.loads((REPO / "shell/data/coco_caption.json").read_text())


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """A torchrun that records its arguments (one a line) in $CAPTURE_FILE, and a python whose CUDA probe finds no
    GPU, so that the launchers take the same path on every machine."""
    bin_dir = tmp_path_factory.mktemp("fake_bin")
    torchrun = bin_dir / "torchrun"
    torchrun.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$CAPTURE_FILE"\n')
    python = bin_dir / "python"
    python.write_text("#!/bin/sh\necho 0\n")
    for tool in (torchrun, python):
        tool.chmod(0o755)
    return torchrun, python


def launch(fakes, name, cwd, *extra, python=None, **env):
    """Run one launcher; return the process and the arguments torchrun got (None when it was not started)."""
    torchrun, fake_python = fakes
    capture = Path(cwd) / f"{name}.args"
    capture.unlink(missing_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    full_env.update(TORCHRUN=str(torchrun), PYTHON=str(python or fake_python), CAPTURE_FILE=str(capture), **env)
    result = subprocess.run(
        ["sh", str(FAMILY / name), *extra], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )
    args = capture.read_text().splitlines() if capture.exists() else None
    return result, args


def entry_point_args(torchrun_args):
    """Everything after the entry point's module: what internvl_chat.cli.finetune receives."""
    index = next(i for i, arg in enumerate(torchrun_args) if arg == ENTRY_POINT)
    return torchrun_args[index + 1 :]


def flag(args, name):
    return args[args.index(name) + 1]


PARSE_SCRIPT = """
import json, sys
from internvl_chat.train.arguments import parse_args
from internvl_chat.train.step_shape import decide_step_shape
out = {}
for name, argv in json.load(open(sys.argv[1])).items():
    model, data, fast, training, run, facts = parse_args(argv)
    step = decide_step_shape(training.per_device_train_batch_size, 2, fast.group_by_image, run.global_batch_size,
                             training.gradient_accumulation_steps)
    out[name] = dict(
        model=model.model_name_or_path, conv_style=facts["template"], meta_path=data.meta_path,
        use_llm_lora=model.use_llm_lora, freeze_llm=model.freeze_llm, freeze_mlp=model.freeze_mlp,
        freeze_backbone=model.freeze_backbone, max_dynamic_patch=data.max_dynamic_patch,
        dynamic_image_size=data.dynamic_image_size, use_thumbnail=data.use_thumbnail, ps_version=facts["ps_version"],
        max_seq_length=data.max_seq_length, deepspeed=training.deepspeed, output_dir=training.output_dir,
        per_device_train_batch_size=training.per_device_train_batch_size,
        gradient_accumulation_steps=step.accumulation, learning_rate=training.learning_rate,
        warmup_steps=training.warmup_steps, report_to=training.report_to, use_cpu=training.use_cpu,
        bf16=training.bf16, save_steps=training.save_steps, num_train_epochs=training.num_train_epochs)
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def parsed(fakes, tmp_path_factory):
    """Every launcher run with GPUS=2 BATCH_SIZE=16 PER_DEVICE_BATCH_SIZE=4 on one host, its arguments parsed by the
    entry point's parser (in one separate process: parsing DeepSpeed TrainingArguments touches global state)."""
    work = tmp_path_factory.mktemp("launch")
    runs, argvs = {}, {}
    cases = {name: () for name in LAUNCHERS}
    cases["override"] = ("--max_dynamic_patch", "1", "--learning_rate", "1e-3")
    for case, extra in cases.items():
        name = case if case in LAUNCHERS else f"{STEMS['2B']}_lora_coco.sh"
        result, args = launch(
            fakes,
            name,
            work,
            *extra,
            GPUS="2",
            BATCH_SIZE="16",
            PER_DEVICE_BATCH_SIZE="4",
            NNODES="1",
            OUTPUT_DIR=str(work / "out" / case),
            MODEL="/models/My Model",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        runs[case] = (result, args)
        argvs[case] = entry_point_args(args)
    argv_file, out_file = work / "argv.json", work / "parsed.json"
    argv_file.write_text(json.dumps(argvs))
    result = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, str(argv_file), str(out_file)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    values = json.loads(out_file.read_text())
    return {case: (runs[case][0], runs[case][1], values[case]) for case in cases}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_flags_parse_with_the_entry_point(parsed, name):
    size, rank, stage, lr, *_ = LAUNCHERS[name]
    result, torchrun_args, got = parsed[name]
    assert "--nproc_per_node=2" in torchrun_args and "--nnodes=1" in torchrun_args
    assert got["conv_style"] == CONV[size]
    assert got["use_llm_lora"] == rank
    lora = name.endswith(("_lora.sh", "_lora_coco.sh"))
    assert (rank > 0) == lora
    assert got["freeze_llm"] is lora and got["freeze_mlp"] is lora and got["freeze_backbone"] is True
    deepspeed = Path(got["deepspeed"])
    assert deepspeed.is_file() and deepspeed.name == f"zero_stage{stage}_config.json"
    assert json.loads(deepspeed.read_text())["zero_optimization"]["stage"] == stage
    assert got["learning_rate"] == pytest.approx(lr)
    # 16 = 4 per process x 2 processes x 2 accumulation steps, decided by the entry point from BATCH_SIZE
    assert got["per_device_train_batch_size"] == 4 and got["gradient_accumulation_steps"] == 2
    assert flag(entry_point_args(torchrun_args), "--global_batch_size") == "16"
    assert "BATCH_SIZE=16, PER_DEVICE_BATCH_SIZE=4, 2 process(es)" in result.stdout
    assert got["model"] == "/models/My Model"
    assert got["output_dir"].endswith(f"out/{name}")
    assert got["dynamic_image_size"] and got["use_thumbnail"] and got["ps_version"] == "v2"
    assert got["max_seq_length"] == 4096 and got["num_train_epochs"] == 1 and got["save_steps"] == 200
    assert got["warmup_steps"] == pytest.approx(0.03) and got["report_to"] == ["tensorboard"]
    assert got["use_cpu"] is True and got["bf16"] is False  # the fake probe found no GPU
    default_meta = "coco_caption.json" if name.endswith("_lora_coco.sh") else "internvl_1_2_finetune_custom.json"
    assert got["meta_path"] == f"./shell/data/{default_meta}"
    assert (REPO / got["meta_path"]).is_file()


def test_extra_arguments_override_the_launcher_flags(parsed):
    got = parsed["override"][2]
    assert got["max_dynamic_patch"] == 1 and got["learning_rate"] == pytest.approx(1e-3)
    assert parsed[f"{STEMS['2B']}_lora_coco.sh"][2]["max_dynamic_patch"] == 6


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_defaults_give_the_original_batch(fakes, tmp_path, name):
    size, _, _, _, gpus, nnodes, batch, per_device = LAUNCHERS[name]
    result, args = launch(fakes, name, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"--nproc_per_node={gpus}" in args and f"--nnodes={nnodes}" in args
    python_args = entry_point_args(args)
    assert int(flag(python_args, "--per_device_train_batch_size")) == per_device
    assert int(flag(python_args, "--global_batch_size")) == batch
    step = decide_step_shape(per_device, gpus * nnodes, False, global_batch_size=batch)
    assert step.accumulation * per_device * gpus * nnodes == batch
    assert flag(python_args, "--model_name_or_path") == MODEL_DIR[size]
    output_dir = flag(python_args, "--output_dir")
    assert output_dir == f"work_dirs/internvl_chat_v2_0/{name[:-3]}"
    assert (tmp_path / output_dir / "training_log.txt").is_file()


def test_data_root_reaches_the_entry_point(fakes, tmp_path):
    name = f"{STEMS['8B']}_lora.sh"
    result, args = launch(fakes, name, tmp_path, DATA_ROOT="/data with space/coco root")
    assert result.returncode == 0, result.stderr
    assert flag(entry_point_args(args), "--data_root") == "/data with space/coco root"
    result, args = launch(fakes, name, tmp_path)
    assert "--data_root" not in args


def test_several_hosts_share_the_batch(fakes, tmp_path):
    result, args = launch(
        fakes, f"{STEMS['76B']}_full.sh", tmp_path, NODE_RANK="3", MASTER_ADDR="10.0.0.1", MASTER_PORT="29999"
    )
    assert result.returncode == 0, result.stderr
    for expected in (
        "--nnodes=4",
        "--node_rank=3",
        "--master_addr=10.0.0.1",
        "--master_port=29999",
        "--nproc_per_node=8",
    ):
        assert expected in args
    assert flag(entry_point_args(args), "--global_batch_size") == "128"
    assert decide_step_shape(1, 8 * 4, False, global_batch_size=128).accumulation == 4  # 128 / (1 x 8 x 4)


def test_a_batch_that_does_not_divide_is_refused(tmp_path):
    """The launchers' check before torchrun (the real one; the fake python above skips it) refuses the step with
    the other problems of the command line, each on a line of its own, the checkpoint's first."""
    result = subprocess.run(
        [sys.executable, "-m", "internvl_chat.cli.finetune_preflight", "--processes", "3",
         "--model_name_or_path", str(tmp_path / "no_model"), "--meta_path", str(tmp_path / "no_meta.json"),
         "--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "4", "--global_batch_size", "16",
         "--max_stepz", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("launch_finetune: ") for line in lines)
    assert "no_model does not exist" in lines[0] and "no_meta.json does not exist" in lines[1]
    assert "BATCH_SIZE=16 is not a multiple of PER_DEVICE_BATCH_SIZE x GPUS x NNODES = 12" in lines[2]
    assert "--max_stepz is not a flag" in lines[3]


@pytest.mark.parametrize(
    "variable,value",
    [
        ("GPUS", "0"),
        ("GPUS", "two"),
        ("GPUS", "-1"),
        ("GPUS", "1.5"),
        ("PER_DEVICE_BATCH_SIZE", "0"),
        ("BATCH_SIZE", "x"),
    ],
)
def test_bad_counts_are_refused(fakes, tmp_path, variable, value):
    result, args = launch(fakes, f"{STEMS['1B']}_lora.sh", tmp_path, **{variable: value})
    assert result.returncode == 2 and args is None
    assert f"{variable} must be a positive whole number, got '{value}'" in result.stderr


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="no .venv")
def test_the_real_gpu_probe(fakes, tmp_path):
    """With the environment's own python the CUDA probe runs for real (GPUS=1 fits any machine), and so do the
    checks before torchrun: here they find no checkpoint, and torchrun is never started."""
    result, args = launch(
        fakes,
        f"{STEMS['2B']}_lora_coco.sh",
        tmp_path,
        python=VENV_PYTHON,
        GPUS="1",
        BATCH_SIZE="8",
        PER_DEVICE_BATCH_SIZE="4",
        OUTPUT_DIR=str(tmp_path / "run"),
    )
    assert result.returncode == 2 and args is None
    assert result.stderr.strip().splitlines()[0] == (  # the checkpoint's problem first, then the data's
        "launch_finetune: checkpoint folder pretrained/InternVL2-2B does not exist; download it with "
        "tools/download_model.sh or build one with tools/make_tiny_model.py"
    )
    assert "GPU" not in result.stderr and not (tmp_path / "run").exists()  # the probe passed, nothing was written
