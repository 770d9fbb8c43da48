"""The InternVL2.5, InternVL3 and InternVL3.5 launchers carry the originals' settings (2.5 and 3.0: the files of
OpenGVLab/InternVL's shell/internvl2.5 and shell/internvl3.0 2nd_finetune folders; 3.5, which the original cannot
LoRA fine-tune: InternVL3's LoRA recipe and InternVL2.5's COCO recipe), read off each script's own flags; the COCO
launchers run end to end in tests/test_generations.py."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# name -> (GPUS, NNODES, BATCH_SIZE, PER_DEVICE, LoRA rank, drop path, lr, weight decay, tiles, tokens, ZeRO config)
ORIGINAL_2_5 = {
    "1b_dynamic_res_2nd_finetune_full": (8, 1, 128, 4, 0, "0.1", "4e-5", "0.01", 6, 8192, "zero_stage1_config.json"),
    "1b_dynamic_res_2nd_finetune_lora": (2, 1, 16, 4, 16, "0.0", "4e-5", "0.01", 6, 8192, "zero_stage1_config.json"),
    "2b_dynamic_res_2nd_finetune_full": (8, 1, 128, 4, 0, "0.1", "4e-5", "0.01", 6, 8192, "zero_stage1_config.json"),
    "2b_dynamic_res_2nd_finetune_lora": (2, 1, 16, 4, 16, "0.0", "4e-5", "0.01", 6, 8192, "zero_stage1_config.json"),
    "2b_dynamic_res_2nd_finetune_lora_coco": (
        8, 1, 512, 4, 128, "0.0", "4e-5", "0.01", 6, 8192, "zero_stage1_config.json"),
    "4b_dynamic_res_2nd_finetune_full": (8, 1, 128, 4, 0, "0.1", "4e-5", "0.01", 6, 8192, "zero_stage1_config.json"),
    "4b_dynamic_res_2nd_finetune_lora": (2, 1, 16, 4, 16, "0.0", "4e-5", "0.01", 6, 8192, "zero_stage1_config.json"),
    "8b_dynamic_res_2nd_finetune_full": (8, 1, 128, 4, 0, "0.1", "4e-5", "0.05", 6, 8192, "zero_stage1_config.json"),
    "8b_dynamic_res_2nd_finetune_lora": (2, 1, 16, 4, 16, "0.0", "4e-5", "0.05", 6, 8192, "zero_stage1_config.json"),
    "26b_dynamic_res_2nd_finetune_full": (8, 1, 128, 2, 0, "0.4", "2e-5", "0.05", 6, 8192, "zero_stage3_config.json"),
    "26b_dynamic_res_2nd_finetune_lora": (2, 1, 16, 2, 16, "0.0", "2e-5", "0.05", 6, 8192, "zero_stage3_config.json"),
    "38b_dynamic_res_2nd_finetune_full": (
        8, 2, 128, 2, 0, "0.4", "2e-5", "0.05", 6, 8192, "zero_stage3_config_34b.json"),
    "38b_dynamic_res_2nd_finetune_lora": (
        2, 1, 16, 2, 16, "0.0", "2e-5", "0.05", 6, 8192, "zero_stage3_config_34b.json"),
    "78b_dynamic_res_2nd_finetune_full": (
        8, 4, 128, 1, 0, "0.4", "2e-5", "0.05", 6, 8192, "zero_stage3_config_100b.json"),
    "78b_dynamic_res_2nd_finetune_lora": (
        8, 1, 16, 1, 16, "0.0", "2e-5", "0.05", 6, 8192, "zero_stage3_config_100b.json"),
}  # fmt: skip
ORIGINAL_3_0_FULL = {
    "1b": (8, 1, 128, 4, 0, "0.0", "1e-5", "0.05", 12, 16384, "zero_stage1_config.json"),
    "2b": (8, 1, 128, 4, 0, "0.0", "2e-5", "0.05", 12, 16384, "zero_stage1_config.json"),
    "8b": (8, 1, 128, 4, 0, "0.0", "2e-5", "0.05", 12, 16384, "zero_stage1_config.json"),
    "9b": (8, 1, 128, 4, 0, "0.0", "2e-5", "0.05", 12, 16384, "zero_stage1_config.json"),
    "14b": (8, 1, 128, 4, 0, "0.1", "2e-5", "0.05", 12, 16384, "zero_stage1_config.json"),
    "38b": (8, 2, 128, 2, 0, "0.2", "2e-5", "0.05", 12, 16384, "zero_stage3_config_34b.json"),
    "78b": (8, 4, 128, 2, 0, "0.4", "2e-5", "0.05", 12, 16384, "zero_stage3_config_100b.json"),
}
COCO = (8, 1, 512, 4, 128, "0.0", "4e-5", "0.01", 6, 8192, "zero_stage1_config.json")


def lora_of(full: tuple, large: bool) -> tuple:
    """A LoRA launcher in the InternVL2.5 form from a full one's recipe: rank 16, no drop path, batch 16 on 2 GPUs
    (8 GPUs at 1 a GPU for the largest)."""
    gpus, _, _, per_device, _, _, lr, wd, tiles, tokens, zero = full
    return (8 if large else 2, 1, 16, 1 if large else per_device, 16, "0.0", lr, wd, tiles, tokens, zero)


EXPECTED = {f"internvl2.5/2nd_finetune/internvl2_5_{stem}.sh": row for stem, row in ORIGINAL_2_5.items()}
for size, row in ORIGINAL_3_0_FULL.items():
    EXPECTED[f"internvl3.0/2nd_finetune/internvl3_{size}_dynamic_res_2nd_finetune_full.sh"] = row
    EXPECTED[f"internvl3.0/2nd_finetune/internvl3_{size}_dynamic_res_2nd_finetune_lora.sh"] = lora_of(
        row, size == "78b"
    )
EXPECTED["internvl3.0/2nd_finetune/internvl3_2b_dynamic_res_2nd_finetune_lora_coco.sh"] = COCO
for size, lr in (("1b", "1e-5"), ("2b", "2e-5"), ("4b", "2e-5"), ("8b", "2e-5"), ("14b", "2e-5"), ("38b", "2e-5")):
    zero = "zero_stage3_config_34b.json" if size == "38b" else "zero_stage1_config.json"
    row = (2, 1, 16, 2 if size == "38b" else 4, 16, "0.0", lr, "0.05", 12, 16384, zero)
    EXPECTED[f"internvl3.5/2nd_finetune/internvl3_5_{size}_dynamic_res_2nd_finetune_lora.sh"] = row
EXPECTED["internvl3.5/2nd_finetune/internvl3_5_2b_dynamic_res_2nd_finetune_lora_coco.sh"] = COCO


def settings(script: str) -> tuple:
    def default(name: str, fallback: int | None = None):
        found = re.search(rf"^export {name}=\$\{{{name}:-(\d+)\}}", script, re.MULTILINE)
        return int(found.group(1)) if found else fallback

    def flag(name: str, fallback: str | None = None) -> str | None:
        found = re.search(rf"^  --{name} (\S+) \\$", script, re.MULTILINE)
        return found.group(1).strip("\"'") if found else fallback

    zero = Path(flag("deepspeed").replace("$shell_dir/", "")).name
    return (
        default("GPUS"),
        default("NNODES", 1),
        default("BATCH_SIZE"),
        default("PER_DEVICE_BATCH_SIZE"),
        int(flag("use_llm_lora", "0")),
        flag("drop_path_rate"),
        flag("learning_rate"),
        flag("weight_decay"),
        int(flag("max_dynamic_patch")),
        int(flag("max_seq_length")),
        zero,
    )


def test_every_launcher_of_the_newer_generations_is_listed():
    found = {str(path.relative_to(REPO / "shell")) for folder in ("internvl2.5", "internvl3.0", "internvl3.5")
             for path in (REPO / "shell" / folder).rglob("*.sh")}  # fmt: skip
    assert found == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_launcher_carries_its_recipe(name):
    script = (REPO / "shell" / name).read_text()
    assert settings(script) == EXPECTED[name]
    assert (REPO / "shell" / settings(script)[-1]).is_file()
    for fixed in ('--conv_style "internvl2_5"', "--use_fast_tokenizer False", "--force_image_size 448",
                  "--freeze_backbone True", "--ps_version 'v2'", '--report_to "tensorboard"'):  # fmt: skip
        assert f"  {fixed} \\" in script, fixed
    lora = "_lora" in name
    assert f"  --freeze_llm {lora} \\" in script and f"  --freeze_mlp {lora} \\" in script
    meta = "coco_caption.json" if name.endswith("_lora_coco.sh") else "internvl_1_2_finetune_custom.json"
    assert f"./shell/data/{meta}" in script
    assert 'exec sh "$shell_dir/launch_finetune.sh"' in script and script.rstrip().endswith('"$@"')
