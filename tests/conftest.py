"""Fixtures shared by the test modules. Everything a test reads is in this repository: the reference facts under
tests/fixtures/ (see its README), the rest built here (tiny checkpoints, tokenizers, a synthetic COCO)."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def caches_in_the_test_folders(tmp_path_factory):
    """What the tests' processes cache (transformers' copies of remote code, matplotlib's fonts) goes to the
    session's temporary folder, not the home folder. DeepSpeed's built ops go where the launchers put them, the
    repository's .cache/, as a build cache beside .venv/."""
    root = tmp_path_factory.mktemp("caches")
    saved = {name: os.environ.get(name) for name in ("HF_MODULES_CACHE", "MPLCONFIGDIR")}
    os.environ["HF_MODULES_CACHE"] = str(root / "hf_modules")
    os.environ["MPLCONFIGDIR"] = str(root / "matplotlib")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Facts of the original implementation: key dumps, a tiny checkpoint it saved and its outputs."""
    return FIXTURES / "reference"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from internvl_chat.devkit.checkpoint import tokenizer_corpus
    from internvl_chat.devkit.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), tokenizer_corpus())


@pytest.fixture(scope="session")
def tiny_qwen2_tokenizer(tmp_path_factory):
    """A Qwen2.5-style byte-level BPE tokenizer (no BOS), as the Qwen2.5 LLMs of InternVL2.5/3 carry it."""
    from internvl_chat.devkit.checkpoint import tokenizer_corpus
    from internvl_chat.devkit.tokenizer import build_tiny_qwen2_tokenizer

    return build_tiny_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2_tokenizer"), tokenizer_corpus(("internvl2_5",)))


@pytest.fixture(scope="session")
def training_dataset(tmp_path_factory, tiny_tokenizer):
    """Three synthetic COCO pictures (15 captions), tiled to at most 2 + 1 tiles of 224 px."""
    from internvl_chat.data.dataset import build_datasets
    from internvl_chat.data.preprocess import ConversationTokenizer
    from internvl_chat.devkit.coco import make_synthetic_coco

    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root / "coco", train_images=3, test_images=1, seed=2, meta_path=root / "meta.json")
    encoder = ConversationTokenizer(tiny_tokenizer, "internlm2-chat", 64, 4096)  # 64 tokens per 224 px tile
    return build_datasets(root / "meta.json", encoder, image_size=224, max_dynamic_patch=2)


@pytest.fixture(scope="session")
def training_items(training_dataset) -> list[dict]:
    """Three captions of different pictures and lengths: a padded batch."""
    return [training_dataset[i] for i in (0, 5, 9)]


@pytest.fixture(scope="session")
def make_lora_model(tiny_tokenizer):
    """A tiny InternVL of an LLM family (and generation: InternVL2's, InternVL3.5's for Qwen3) with LoRA (r 8, no
    dropout) on its LLM, B initialised away from zero as after some training (so that A gets gradients too); its
    vocabulary and <IMG_CONTEXT> id are the given tokenizer's (default: the tiny InternLM2-style one)."""
    from internvl_chat.devkit.checkpoint import tiny_config_dict
    from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig
    from internvl_chat.model.modeling_internvl_chat import InternVLChatModel

    def make(llm: str = "internlm2", generation: str | None = None, tokenizer=None):
        tokenizer = tokenizer or tiny_tokenizer
        torch.manual_seed(0)
        generation = generation or ("3.5" if llm == "qwen3" else "2")  # Qwen3 LLMs come with InternVL3.5 only
        config = InternVLChatConfig(
            **tiny_config_dict(llm=llm, vocab_size=len(tokenizer), image_size=224, generation=generation)
        )
        model = InternVLChatModel(config)
        model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        for parameter in model.parameters():
            parameter.requires_grad = False
        model.wrap_llm_lora(r=8, lora_alpha=16, lora_dropout=0.0)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.02)
        return model

    return make


@pytest.fixture(scope="session")
def lora_model(make_lora_model):
    return make_lora_model()
