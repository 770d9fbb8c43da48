"""Tiny checkpoints of every LLM family and both ViT variants: they save in the real format, reload through
AutoModel in a fresh offline process with identical logits, generate the same with and without KV cache, and
batch_chat (left padding) answers exactly as chat() does one question at a time."""

import json
import os
import subprocess
import sys

import pytest
import torch

from internvl_chat.checkpoint.loader import load_model, load_tokenizer
from internvl_chat.devkit.checkpoint import build_checkpoint

FAMILIES = [("internlm2", "300m"), ("internlm2", "6b"), ("qwen2", "300m"), ("phi3", "300m"), ("llama", "300m")]
GREEDY = dict(max_new_tokens=12, min_new_tokens=8, do_sample=False, num_beams=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        family: build_checkpoint(root / f"{family[0]}-{family[1]}", llm=family[0], vit=family[1], seed=3)
        for family in FAMILIES
    }


def fixed_inputs(model, tokenizer, num_tiles=2):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(num_tiles, 3, 448, 448, generator=generator)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    query = model.build_prompt("<image>\nDescribe the image.").replace(
        "<image>", "<img>" + "<IMG_CONTEXT>" * (model.num_image_token * num_tiles) + "</img>"
    )
    input_ids = tokenizer(query, return_tensors="pt")["input_ids"]
    return pixel_values, input_ids


def test_remote_code_files_and_auto_map(checkpoints):
    for folder in checkpoints.values():
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_internvl_chat.InternVLChatModel"
        assert config["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"
        for name in (
            "modeling_internvl_chat.py",
            "modeling_intern_vit.py",
            "modeling_internlm2.py",
            "configuration_internvl_chat.py",
            "configuration_intern_vit.py",
            "configuration_internlm2.py",
            "fused_kernels.py",
            "conversation.py",
            "tokenization_internlm2.py",
            "tokenizer.model",
            "model.safetensors",
        ):
            assert (folder / name).is_file(), folder / name


def test_automodel_in_fresh_offline_process_gives_identical_logits(checkpoints, tmp_path):
    expected = {}
    for folder in checkpoints.values():
        model = load_model(folder, dtype=torch.float32, device="cpu")
        tokenizer = load_tokenizer(folder)
        pixel_values, input_ids = fixed_inputs(model, tokenizer)
        torch.save({"pixel_values": pixel_values, "input_ids": input_ids}, tmp_path / f"{folder.name}.inputs.pt")
        with torch.no_grad():
            expected[folder.name] = model(pixel_values=pixel_values, input_ids=input_ids).logits
    script = r"""
import sys, torch
from transformers import AutoModel, AutoTokenizer
for folder in sys.argv[2:]:
    name = folder.rstrip('/').split('/')[-1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
    inputs = torch.load(f'{sys.argv[1]}/{name}.inputs.pt')
    model.img_context_token_id = tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>')
    with torch.no_grad():
        logits = model(pixel_values=inputs['pixel_values'], input_ids=inputs['input_ids']).logits
    torch.save(logits, f'{sys.argv[1]}/{name}.logits.pt')
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), *map(str, checkpoints.values())],
        check=True,
        cwd=tmp_path,
        env=env,
    )
    for name, logits in expected.items():
        assert torch.equal(torch.load(tmp_path / f"{name}.logits.pt"), logits), name


@pytest.mark.parametrize("family", [("internlm2", "300m"), ("qwen2", "300m")])
def test_generate_with_and_without_cache(checkpoints, family):
    model = load_model(checkpoints[family], dtype=torch.float32, device="cpu", attn_implementation="eager")
    tokenizer = load_tokenizer(checkpoints[family])
    pixel_values, input_ids = fixed_inputs(model, tokenizer)
    cached = model.generate(pixel_values=pixel_values, input_ids=input_ids, use_cache=True, **GREEDY)
    uncached = model.generate(pixel_values=pixel_values, input_ids=input_ids, use_cache=False, **GREEDY)
    assert cached.shape[1] >= 8
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", [("internlm2", "300m"), ("qwen2", "300m")])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batch_chat_equals_chat_one_by_one(checkpoints, family, attn):
    model = load_model(checkpoints[family], dtype=torch.float32, device="cpu", attn_implementation=attn)
    tokenizer = load_tokenizer(checkpoints[family])
    generator = torch.Generator().manual_seed(1)
    tiles = [1, 3, 2]
    images = [torch.randn(n, 3, 448, 448, generator=generator) for n in tiles]
    questions = ["Describe the image.", "What is in the top left corner of this picture?", "Caption it."]
    one_by_one = [model.chat(tokenizer, image, question, GREEDY) for image, question in zip(images, questions)]
    batched = model.batch_chat(tokenizer, torch.cat(images), questions, GREEDY, num_patches_list=tiles)
    assert batched == one_by_one
    assert all(len(tokenizer(answer)["input_ids"]) > 1 for answer in one_by_one)
