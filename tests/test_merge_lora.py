"""tools/merge_lora.py on a tiny model trained for a few LoRA steps: the tutorial's six lines, merged logits and
captions equal the unmerged model's, and the output loads through AutoModel offline and through our loader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internvl_chat.checkpoint.loader import load_model, load_tokenizer
from internvl_chat.data.collator import concat_pad_data_collator
from internvl_chat.data.dataset import build_datasets
from internvl_chat.data.preprocess import ConversationTokenizer
from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.devkit.coco import make_synthetic_coco
from internvl_chat.model.modeling_internvl_chat import InternVLChatModel

REPO = Path(__file__).resolve().parents[1]
MERGE = REPO / "tools/merge_lora.py"
GREEDY = dict(max_new_tokens=12, min_new_tokens=8, do_sample=False)
SIX_LINES = ["Loading model...", None, "Loading tokenizer...", "Saving model...", "Saving tokenizer...", "Done!"]


def train_lora(base: Path, data_root: Path, out: Path, dtype: torch.dtype) -> Path:
    """Three AdamW steps on LoRA adapters, then save the way the Trainer does (base + adapters, PEFT keys)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(base)
    model = InternVLChatModel.from_pretrained(base, dtype=torch.float32)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.wrap_llm_lora(r=8, lora_alpha=16, lora_dropout=0.0)
    model.config.use_llm_lora = 8
    encoder = ConversationTokenizer(tokenizer, "internlm2-chat", model.num_image_token, 4096)
    dataset = build_datasets(data_root / "meta.json", encoder, max_dynamic_patch=2)
    batch = concat_pad_data_collator([dataset[i] for i in range(3)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = build_checkpoint(root / "base", seed=2)
    make_synthetic_coco(root / "coco", train_images=3, test_images=1, seed=1, meta_path=root / "meta.json")
    return root, base


def run_merge(source: Path, target: Path, *extra):
    return subprocess.run(
        [sys.executable, str(MERGE), str(source), str(target), *extra], capture_output=True, text=True, timeout=300
    )


def fixed_inputs(model, tokenizer):
    generator = torch.Generator().manual_seed(4)
    pixel_values = torch.randn(2, 3, 448, 448, generator=generator)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    prompt = model.build_prompt("<image>\nDescribe.").replace(
        "<image>", "<img>" + "<IMG_CONTEXT>" * (2 * model.num_image_token) + "</img>"
    )
    return pixel_values, tokenizer(prompt, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merged_equals_unmerged(world, dtype, tolerance):
    root, base = world
    lora = train_lora(base, root, root / f"lora_{dtype}".replace("torch.", ""), dtype)
    merged = root / f"merged_{dtype}".replace("torch.", "")
    result = run_merge(lora, merged)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 and all(want is None or got == want for got, want in zip(lines, SIX_LINES))
    assert lines[1].startswith("trainable params: ") and "|| all params: " in lines[1]

    config = json.loads((merged / "config.json").read_text())
    assert config["use_llm_lora"] == 0 and config["max_dynamic_patch"] == 12 and config["dtype"] == str(dtype)[6:]
    assert config["auto_map"]["AutoModel"] == "modeling_internvl_chat.InternVLChatModel"
    assert (merged / "generation_config.json").is_file() and (merged / "modeling_internvl_chat.py").is_file()

    unmerged_model = load_model(lora, dtype=dtype, device="cpu")
    merged_model, info = InternVLChatModel.from_pretrained(merged, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in key for key in merged_model.state_dict())
    tokenizer = load_tokenizer(merged)
    pixel_values, input_ids = fixed_inputs(unmerged_model, tokenizer)
    fixed_inputs(merged_model, tokenizer)
    with torch.no_grad():
        a = unmerged_model(pixel_values=pixel_values.to(dtype), input_ids=input_ids).logits.float()
        b = merged_model.eval()(pixel_values=pixel_values.to(dtype), input_ids=input_ids).logits.float()
        base_model = load_model(base, dtype=dtype, device="cpu")
        fixed_inputs(base_model, tokenizer)
        base_logits = base_model(pixel_values=pixel_values.to(dtype), input_ids=input_ids).logits.float()
    error = float((a - b).abs().max() / a.abs().max())
    assert error <= tolerance, error
    assert float((a - base_logits).abs().max() / a.abs().max()) > 10 * tolerance  # the adapters mattered
    if dtype == torch.float32:
        assert unmerged_model.chat(tokenizer, pixel_values, "Describe.", GREEDY) == merged_model.chat(
            tokenizer, pixel_values, "Describe.", GREEDY
        )


def test_automodel_loads_the_merged_folder_offline(world, tmp_path):
    root, base = world
    merged = root / "merged_float32"
    if not merged.exists():
        pytest.skip("needs the float32 merge of test_merged_equals_unmerged")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "px = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))\n"
        "print('ANSWER', repr(m.chat(t, px, 'Describe the image.', dict(max_new_tokens=10, do_sample=False))))\n"
        "from transformers import AutoModelForCausalLM\n"
        "print('CAUSAL_LM', type(AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)).__name__)\n"
        "messages = [{'role': 'user', 'content': 'Describe the image.'}]\n"
        "print('PROMPT', repr(t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", script, str(merged)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ANSWER '" in result.stdout
    # what serving engines read: AutoModelForCausalLM, the original 2B's chat template, its stop tokens
    assert "CAUSAL_LM InternVLChatModel" in result.stdout
    assert "PROMPT '<s><|im_start|>user\\nDescribe the image.<|im_end|>\\n<|im_start|>assistant\\n'" in result.stdout
    assert len(json.loads((merged / "config.json").read_text())["auto_map"]) == 3
    tokens = json.loads((merged / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    stops = [int(i) for name in ("<|im_end|>", "<|im_start|>") for i, t in tokens.items() if t["content"] == name]
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == stops


def test_refusals(world, tmp_path):
    root, base = world
    no_lora = run_merge(base, tmp_path / "out")
    assert no_lora.returncode != 0 and "there is no LoRA to merge" in no_lora.stderr
    missing = run_merge(tmp_path / "nowhere", tmp_path / "out")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    lora = root / "lora_float32"
    if lora.exists():
        refused = run_merge(lora, occupied)
        assert refused.returncode != 0 and "pass --force" in refused.stderr
        assert (occupied / "keep.txt").read_text() == "precious"


def test_not_enough_disk_is_refused(tmp_path, monkeypatch):
    from internvl_chat.cli import merge_lora

    class Usage:
        free = 10 * 2**20

    monkeypatch.setattr(merge_lora.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(merge_lora.MergeError, match="not enough disk space"):
        merge_lora.check_free_space(tmp_path / "out", 2**30)
