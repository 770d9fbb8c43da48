"""The fast caption engine on every LLM family: language-pretrained tiny models of InternLM2 (InternVL2-2B, 8B, 26B),
Qwen2 (1B), Phi-3 (4B), Llama (40B, 76B) and Qwen3 (InternVL3.5) give through it the captions of the original path
(chat() image by image through generate(), fp32, greedy), at the engine level under both attentions and with a
min-new-tokens rule that binds, and through evaluate.sh end to end with the engine it picks by default."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from internvl_chat.checkpoint.loader import load_model, load_tokenizer
from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.devkit.coco import make_synthetic_coco
from internvl_chat.eval.caption_data import CaptionImages
from internvl_chat.eval.caption_sets import CAPTION_SETS, read_entries
from internvl_chat.eval.captioner import ChatCaptioner, build_captioner, choose_engine
from internvl_chat.eval.fast_captioner import FastCaptioner, fast_engine_attention
from internvl_chat.eval.generation import generate_captions

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["internlm2", "qwen2", "phi3", "llama", "qwen3"]
# A seed a family whose language pretraining writes captions that end before 30 new tokens on the pictures below.
SEEDS = {"internlm2": 0, "qwen2": 1, "phi3": 0, "llama": 0, "qwen3": 0}
GENERATION = {"qwen3": "3.5"}  # Qwen3 LLMs come with InternVL3.5 (its template and Qwen tokenizer)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One language-pretrained tiny checkpoint a family: its captions are text that ends with the template's stop
    token (<|im_end|> of InternLM2's and Hermes-2's templates, Phi-3's <|end|>), at different lengths."""
    root = tmp_path_factory.mktemp("families")
    return {
        family: build_checkpoint(
            root / family,
            llm=family,
            seed=SEEDS[family],
            pretrain_steps=80,
            image_size=224,
            generation=GENERATION.get(family, "2"),
        )
        for family in FAMILIES
    }


def token_count(tokenizer, caption: str) -> int:
    return len(tokenizer(caption, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_fast_engine_gives_the_captions_of_chat(checkpoints, family, attention):
    """A batch of four one-tile pictures: each caption that chat() writes for the picture alone, under the
    original's min-new-tokens rule (8), where some captions end at the template's stop token, and under a rule that
    binds (the stop token refused until past the shortest caption's length)."""
    folder = checkpoints[family]
    tokenizer = load_tokenizer(folder)
    attention_of = fast_engine_attention(attention)
    fast_model = load_model(folder, dtype=torch.float32, device="cpu", attn_implementation=attention_of)
    chat_model = load_model(folder, dtype=torch.float32, device="cpu", attn_implementation=attention)
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def captions(min_new_tokens: int) -> list[str]:
        fast = FastCaptioner(fast_model, tokenizer, "Describe the image.", 30, min_new_tokens, batch_size=4)
        assert fast.eos_id == tokenizer.convert_tokens_to_ids(chat_model.conv_template.sep.strip())
        chat = ChatCaptioner(chat_model, tokenizer, "Describe the image.", 30, min_new_tokens)
        written = fast.caption(pixels, [1, 1, 1, 1])
        assert written == [chat.caption(pixels[i : i + 1], [1])[0] for i in range(4)]
        return written

    original_rule = captions(8)
    shortest = min(token_count(tokenizer, caption) for caption in original_rule)
    assert shortest < 25, original_rule  # a caption ended at the stop token
    binding_rule = captions(shortest + 3)
    assert binding_rule != original_rule


def evaluate(root: Path, family: str, *options) -> tuple[list, str]:
    out = root / f"results_{family}_{'_'.join(o.strip('-') for o in options) or 'default'}"
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_PORT",)}
    env["GPUS"] = "1"
    result = subprocess.run(
        ["sh", str(REPO / "evaluate.sh"), f"pretrained/{family}", "caption-coco", "--dynamic", "--out-dir", str(out),
         *options],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results,) = out.glob("coco_*.json")
    return json.loads(results.read_text()), result.stdout


def original_path_captions(root: Path, folder: Path) -> list[dict]:
    """What `--engine hf --batch-size 1` writes, in process: chat() picture by picture, in dataset order."""
    entries, _ = read_entries(CAPTION_SETS["coco"], str(root))
    model = load_model(folder, dtype=torch.float32, device="cpu")
    dataset = CaptionImages.for_model(entries, model.config, dynamic=True, max_dynamic_patch=6)
    choice = choose_engine(model.config, "hf", 1, 0.0, True, None)
    captioner = build_captioner(choice, model, load_tokenizer(folder), 30, 8)
    ids, captions, _, _ = generate_captions(
        dataset, captioner, list(range(len(dataset))), torch.device("cpu"), torch.float32, 0
    )
    return [{"image_id": image_id, "caption": caption} for image_id, caption in zip(ids, captions)]


@pytest.mark.parametrize("family", ["qwen2", "phi3", "llama"])
def test_evaluate_sh_picks_the_fast_engine_and_writes_the_captions_of_the_original_path(checkpoints, tmp_path, family):
    """`GPUS=1 sh evaluate.sh MODEL caption-coco --dynamic`, as the tutorial types it, on the 1B's, 4B's and 40B/76B's
    LLM families: the fast engine by default, and the captions the original path writes (the hf engine at batch 1;
    tests/test_eval_caption.py runs that one through evaluate.sh too, on InternLM2)."""
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / family).symlink_to(checkpoints[family])
    make_synthetic_coco(tmp_path / "data/coco", train_images=1, test_images=4, seed=5)
    # the captions are compared here; scoring is tested in tests/test_eval_caption.py and tests/test_generations.py
    fast, stdout = evaluate(tmp_path, family, "--skip-scoring")
    assert "fast engine" in stdout and "LLM internvl_fast_decode" in stdout
    original = original_path_captions(tmp_path, checkpoints[family])
    assert fast == original and len(original) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton kernels need a GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_on_a_gpu_the_recorded_decoding_step_is_the_step(checkpoints, family):
    """On a GPU each decoding step is replayed as a CUDA graph: in fp32 its captions are chat()'s, and in bf16 (the
    fused kernels on) those of the same steps launched from Python."""
    folder, device = checkpoints[family], torch.device("cuda")
    tokenizer = load_tokenizer(folder)
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    attention = fast_engine_attention(None)
    fast_model = load_model(folder, dtype=torch.float32, device="cuda", attn_implementation=attention)
    chat_model = load_model(folder, dtype=torch.float32, device="cuda")
    chat = ChatCaptioner(chat_model, tokenizer, "Describe the image.", 30, 8)
    fast = FastCaptioner(fast_model, tokenizer, "Describe the image.", 30, 8, batch_size=4)
    assert fast.caption(pixels, [1] * 4) == [chat.caption(pixels[i : i + 1], [1])[0] for i in range(4)]
    assert fast._decode_state.graph is not None
    half_model = load_model(folder, dtype=torch.bfloat16, device="cuda", attn_implementation=attention)
    half = pixels.to(torch.bfloat16)
    graphs = FastCaptioner(half_model, tokenizer, "Describe the image.", 30, 8, batch_size=4).caption(half, [1] * 4)
    steps = FastCaptioner(half_model, tokenizer, "Describe the image.", 30, 8, batch_size=4, cuda_graphs=False)
    assert graphs == steps.caption(half, [1] * 4)
