"""InternVL2.5, InternVL3 and InternVL3.5 through the tutorial's commands on the CPU, on tiny models of each generation
in its real format (tools/make_tiny_model.py --version 2.5: InternLM2.5 LLM and tokenizer; --version 3: Qwen2.5 LLM
and its byte BPE tokenizer; --version 3.5: Qwen3 LLM and its tokenizer): the generation's COCO LoRA launcher trains
a few steps, tools/merge_lora.py merges, the merged folder chats with AutoModel offline and carries the generation's
serving files, and evaluate.sh scores it with the fast engine. Also the presets of every size and the refusals
before torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_chat.checkpoint.folder import LLM_ARCHITECTURES, CheckpointError, check_checkpoint_folder
from internvl_chat.checkpoint.loader import load_tokenizer
from internvl_chat.checkpoint.presets import PRESETS, preset_config_dict
from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.devkit.coco import make_synthetic_coco
from internvl_chat.model.configuration_internvl_chat import LLM_CONFIG_CLASSES, InternVLChatConfig
from internvl_chat.model.conversation import INTERNVL2_5_SYSTEM_MESSAGE

REPO = Path(__file__).resolve().parents[1]
COCO_LAUNCHERS = {
    "2.5": REPO / "shell/internvl2.5/2nd_finetune/internvl2_5_2b_dynamic_res_2nd_finetune_lora_coco.sh",
    "3": REPO / "shell/internvl3.0/2nd_finetune/internvl3_2b_dynamic_res_2nd_finetune_lora_coco.sh",
    "3.5": REPO / "shell/internvl3.5/2nd_finetune/internvl3_5_2b_dynamic_res_2nd_finetune_lora_coco.sh",
}
LLM = {"2.5": "internlm2", "3": "qwen2", "3.5": "qwen3"}
FAST = ["--max_dynamic_patch", "1", "--dataloader_num_workers", "0", "--learning_rate", "2e-3", "--seed", "7"]

pytestmark = pytest.mark.slow


def run(command, cwd, timeout=600, **env):
    environment = {key: value for key, value in os.environ.items() if key != "MASTER_PORT"}
    environment.update(env)
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    return result


@pytest.fixture(scope="module", params=["2.5", "3", "3.5"])
def world(request, tmp_path_factory):
    """A tiny checkpoint of the generation (made as the README says), a synthetic COCO, a 2-step LoRA run of the
    generation's COCO launcher, and its merge."""
    version = request.param
    root = tmp_path_factory.mktemp(f"internvl{version}")
    model = root / f"pretrained/InternVL{version}-tiny"
    if version == "3":  # the README's command; the other generation in process (a second less of start-up)
        made = run([sys.executable, str(REPO / "tools/make_tiny_model.py"), str(model), "--version", version], root)
        assert made.returncode == 0, made.stderr[-3000:]
    else:
        build_checkpoint(model, llm=LLM[version], generation=version)
    make_synthetic_coco(root / "data/coco", train_images=4, test_images=2, seed=0, meta_path=root / "meta.json")
    trained = run(
        ["sh", str(COCO_LAUNCHERS[version]), *FAST, "--max_steps", "2", "--save_steps", "2"],
        root,
        GPUS="1",
        BATCH_SIZE="4",
        PER_DEVICE_BATCH_SIZE="2",
        MODEL=str(model),
        META_PATH=str(root / "meta.json"),
        OUTPUT_DIR=str(root / "run"),
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    merged = run([sys.executable, str(REPO / "tools/merge_lora.py"), str(root / "run"), str(root / "merged")], root)
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    return version, root, model


def test_the_coco_launcher_trains_with_the_internvl2_5_template(world):
    version, root, model = world
    config = json.loads((root / "run/config.json").read_text())
    assert config["template"] == "internvl2_5" and config["use_llm_lora"] == 128
    llm = config["llm_config"]["architectures"][0]
    assert llm == {"2.5": "InternLM2ForCausalLM", "3": "Qwen2ForCausalLM", "3.5": "Qwen3ForCausalLM"}[version]
    log = (root / "run/training_log.txt").read_text()
    assert "step 2/2 (100%) | loss " in log and "trainable params:" in log
    assert "Traceback" not in log and "mismatch" not in log
    # the tokenizer of the generation travels with the run: sentencepiece for InternLM2.5, byte BPE for Qwen2.5
    assert (root / "run" / ("tokenizer.model" if version == "2.5" else "tokenizer.json")).is_file()


def test_the_merged_folder_chats_with_automodel_offline_and_carries_the_serving_files(world, tmp_path):
    version, root, _ = world
    merged = root / "merged"
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "px = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))\n"
        "answer, history = m.chat(t, px, 'Describe the image.', dict(max_new_tokens=6, do_sample=False),\n"
        "                         return_history=True, verbose=False)\n"
        "print('ANSWER', repr(answer))\n"
        "messages = [{'role': 'user', 'content': '<image>\\nDescribe the image.'}]\n"
        "print('PROMPT', repr(t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))\n"
    )
    env = dict(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    result = run([sys.executable, "-c", script, str(merged)], tmp_path, timeout=300, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ANSWER '" in result.stdout
    # the chat template builds chat()'s prompt (the internvl2_5 system message, a newline after each <|im_end|>)
    bos = "<s>" if version == "2.5" else ""
    prompt = (
        f"{bos}<|im_start|>system\n{INTERNVL2_5_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n<image>\n"
        "Describe the image.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert f"PROMPT {prompt!r}" in result.stdout
    ids = load_tokenizer(merged).convert_tokens_to_ids
    stops = ("<|im_end|>", "<|im_start|>") if version == "2.5" else ("<|im_start|>", "<|im_end|>")
    expected = [ids(token) for token in stops]
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == expected
    config = json.loads((merged / "config.json").read_text())
    assert config["template"] == "internvl2_5" and config["hidden_size"] == config["llm_config"]["hidden_size"]
    assert config["tie_word_embeddings"] is False and config["llm_config"]["tie_word_embeddings"] is False
    assert len(config["auto_map"]) == 3 and not list(merged.glob("adapter_*"))


def test_evaluate_sh_scores_the_merged_folder_with_the_fast_engine(world):
    version, root, _ = world
    result = run(
        ["sh", str(REPO / "evaluate.sh"), "merged", "caption-coco", "--dynamic", "--out-dir", "results"], root, GPUS="1"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fast engine" in result.stdout and "CIDEr: " in result.stdout
    (captions,) = (root / "results").glob("coco_*.json")
    assert len(json.loads(captions.read_text())) == 2


def test_presets_of_every_size_build_their_configs():
    generations = {name.split("-")[0] for name in PRESETS}
    assert generations == {"InternVL2", "InternVL2_5", "InternVL3", "InternVL3_5"}
    vocabularies = {"InternLM2ForCausalLM": 92553, "Qwen2ForCausalLM": 151674, "Qwen3ForCausalLM": 151678}
    for name in PRESETS:
        config = InternVLChatConfig(**preset_config_dict(name))
        assert config.hidden_size == config.llm_config.hidden_size and not config.llm_config.tie_word_embeddings
        if not name.startswith("InternVL2-"):
            assert config.template == "internvl2_5"
            assert config.llm_config.vocab_size == vocabularies[config.llm_config.architectures[0]], name
    assert set(LLM_ARCHITECTURES) == set(LLM_CONFIG_CLASSES)


def edit_config(folder: Path, **fields):
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    for key, value in fields.items():
        if key == "llm_architecture":
            config["llm_config"]["architectures"] = [value]
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def small_folder(world, tmp_path_factory):
    """The tiny checkpoint's config and tokenizer files (no weights needed for the folder checks beyond a name)."""
    version, root, model = world
    folder = tmp_path_factory.mktemp("bad")
    for path in model.iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_refusals_before_torchrun(world, small_folder, tmp_path):
    version, root, model = world
    folder = tmp_path / "m"
    folder.mkdir()
    for path in small_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    check_checkpoint_folder(folder)

    # a --conv_style that contradicts the checkpoint's template stops the launcher before torchrun
    result = run(
        ["sh", str(COCO_LAUNCHERS[version]), "--conv_style", "internlm2-chat"],
        root,
        GPUS="1",
        MODEL=str(model),
        META_PATH=str(root / "meta.json"),
        OUTPUT_DIR=str(tmp_path / "out"),
        TORCHRUN="false",
    )
    assert result.returncode != 0
    assert "--conv_style internlm2-chat contradicts the checkpoint" in result.stderr
    assert "has template 'internvl2_5'" in result.stderr and not (tmp_path / "out").exists()

    edit_config(folder, llm_architecture="InternLM3ForCausalLM")
    with pytest.raises(CheckpointError, match=r"InternLM3ForCausalLM, InternLM3 \(InternVL3-9B"):
        check_checkpoint_folder(folder)
    edit_config(folder, llm_architecture="MistralForCausalLM")
    with pytest.raises(CheckpointError, match="'MistralForCausalLM', an LLM this repository does not know"):
        check_checkpoint_folder(folder)
    edit_config(folder, llm_architecture="Qwen2ForCausalLM", template="internvl4")
    with pytest.raises(CheckpointError, match="template 'internvl4' is not a chat template of a known"):
        check_checkpoint_folder(folder)

    # a tokenizer folder without the template's tokens
    edit_config(folder, template="internvl2_5", **{"llm_architecture": model_llm(model)})
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json", "vocab.json"):
        path = folder / name
        if path.is_file():
            path.write_bytes(path.read_bytes().replace(b"<|im_end|>", b"<|xx_end|>"))
    with pytest.raises(CheckpointError, match=r"lacks <\|im_end\|> of the internvl2_5 template"):
        check_checkpoint_folder(folder)


def model_llm(model: Path) -> str:
    return json.loads((model / "config.json").read_text())["llm_config"]["architectures"][0]


def test_presets_hold_the_config_values_seen_in_the_originals(reference_dir):
    """Every value seen in a public copy of an original InternVL2.5/3 config.json is the preset's."""
    seen = json.loads((reference_dir / "internvl2_5_and_3_configs.json").read_text())
    checked = 0
    for name, parts in seen.items():
        if name.startswith("_"):
            continue
        raw = preset_config_dict(name)
        built = InternVLChatConfig(**preset_config_dict(name)).to_dict()  # what it derives (top-level hidden_size)
        for part, fields in parts.items():
            stored = (raw, built) if part == "top" else (raw[part], built[part])
            for field, value in fields.items():
                actual = stored[0][field] if field in stored[0] else stored[1].get(field)
                assert actual == value, (name, part, field)
                checked += 1
    for name, layers in seen["_layers_seen_in_the_model_cards"].items():
        assert preset_config_dict(name)["llm_config"]["num_hidden_layers"] == layers, name
    assert checked > 50


def test_the_lora_line_of_the_internvl3_5_2b_shape_is_the_count_its_config_gives(capsys):
    """Rank 128 on the seven projections of each Qwen3 layer, as the tutorial's LoRA: r x (in + out) each, from the
    config's widths (Qwen3's heads are 128 wide whatever the hidden size), printed as the tutorial prints it."""
    import torch

    from internvl_chat.model.modeling_internvl_chat import InternVLChatModel

    config = InternVLChatConfig(**preset_config_dict("InternVL3_5-2B"))
    llm = config.llm_config
    hidden, inter, rank = llm.hidden_size, llm.intermediate_size, 128
    q_width, kv_width = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    widths = [(hidden, q_width), (hidden, kv_width), (hidden, kv_width), (q_width, hidden)]
    widths += [(hidden, inter), (hidden, inter), (inter, hidden)]
    expected = llm.num_hidden_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in widths)
    with torch.device("meta"):
        model = InternVLChatModel(config)
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.wrap_llm_lora(r=rank, lora_alpha=2 * rank, lora_dropout=0.05)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected == 139_460_608
    assert f"trainable params: {expected:,} || all params: " in capsys.readouterr().out


@pytest.mark.parametrize("llm", ["qwen2", "qwen3"])
def test_the_head_is_tied_only_where_the_generations_code_ties_it(llm, tmp_path):
    """InternVL2/2.5/3 store the LM head apart from the embeddings whatever the LLM's config says; InternVL3.5's
    code takes the Qwen3 LLM's own tie_word_embeddings, so a tied 3.5 folder (no lm_head weights) loads tied, not
    with a head left at random."""
    from safetensors import safe_open

    from internvl_chat.devkit.checkpoint import tiny_config_dict
    from internvl_chat.model.modeling_internvl_chat import InternVLChatModel

    generation = "3.5" if llm == "qwen3" else "3"
    fields = tiny_config_dict(llm=llm, vocab_size=700, image_size=224, generation=generation)
    fields["llm_config"]["tie_word_embeddings"] = True
    model = InternVLChatModel(InternVLChatConfig(**fields))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        head_stored = any(key.endswith("lm_head.weight") for key in weights.keys())
    loaded = InternVLChatModel.from_pretrained(tmp_path).language_model
    tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert (tied, head_stored) == ((True, False) if llm == "qwen3" else (False, True))
    assert json.loads((tmp_path / "config.json").read_text())["llm_config"]["tie_word_embeddings"] is tied
