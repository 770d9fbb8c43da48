"""Conversation templates, InternLM2Tokenizer and the locally trained tiny tokenizer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from internvl_chat.devkit.tokenizer import (
    INTERNLM2_CHAT_TOKENS,
    INTERNVL2_TOKENS,
    _train_sp_model,
    build_tiny_tokenizer,
)
from internvl_chat.model import conversation
from internvl_chat.model.conversation import get_conv_template
from internvl_chat.model.tokenization_internlm2 import InternLM2Tokenizer

MODEL_DIR = Path(conversation.__file__).resolve().parent

# Written out here on purpose (not imported) so a typo in the module is caught.
SYS = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
PROMPT = "Provide a one-sentence caption for the provided image."
CAPTION = "A woman wearing a net on her head cutting a cake. "  # COCO captions carry trailing spaces

# FORMAT.md §4.1, with ↵ written as \n.
EXPECTED_INTERNLM2_CAPTION = (
    "<|im_start|>system\n" + SYS + "<|im_end|>"
    "<|im_start|>user\n<image>\n" + PROMPT + "<|im_end|>"
    "<|im_start|>assistant\n" + CAPTION.strip() + "<|im_end|>"
)

CAPTIONS = [
    "A woman wearing a net on her head cutting a cake. ",
    "A dog runs across the green grass with a red ball.",
    "Two men riding horses on a beach at sunset.",
    "A red double decker bus parked next to a tall building.",
    "A plate of food with broccoli, rice and chicken on a table.",
    "A cat sleeping on a laptop keyboard in an office.",
    "People standing on a train platform waiting for the train.",
    "A little girl holding an umbrella in the rain.",
]


def caption_sample(template="internlm2-chat", caption=CAPTION, n_context=0):
    conv = get_conv_template(template)
    conv.append_message(conv.roles[0], "<image>\n" + PROMPT)
    conv.append_message(conv.roles[1], caption.strip())
    prompt = conv.get_prompt()
    if n_context:
        prompt = prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * n_context + "</img>", 1)
    return conv, prompt


# --------------------------------------------------------------------------- templates
def test_system_message_is_the_59_char_original():
    assert len(SYS) == 59
    for name in ("internlm2-chat", "Hermes-2", "phi3-chat"):
        assert get_conv_template(name).system_message == SYS
    assert get_conv_template("internvl2_5").system_message == SYS_2_5


def test_internlm2_chat_caption_sample_renders_byte_exact():
    _, prompt = caption_sample("internlm2-chat")
    assert prompt == EXPECTED_INTERNLM2_CAPTION
    assert prompt.encode("utf-8") == EXPECTED_INTERNLM2_CAPTION.encode("utf-8")
    assert "<|im_end|>\n" not in prompt  # no newline after <|im_end|> in InternVL2


def test_generation_prompt_ends_with_open_assistant_turn():
    conv = get_conv_template("internlm2-chat")
    conv.append_message(conv.roles[0], "<image>\n" + PROMPT)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    assert prompt.endswith("<|im_end|><|im_start|>assistant\n")
    assert prompt == EXPECTED_INTERNLM2_CAPTION[: EXPECTED_INTERNLM2_CAPTION.index("assistant\n") + len("assistant\n")]


def test_hermes2_renders_like_internlm2_chat():
    assert caption_sample("Hermes-2")[1] == EXPECTED_INTERNLM2_CAPTION
    conv = get_conv_template("Hermes-2")
    assert conv.sep == "<|im_end|>" and conv.stop_str == "<|endoftext|>"


def test_phi3_chat_rendering():
    conv = get_conv_template("phi3-chat")
    conv.append_message(conv.roles[0], "<image>\n" + PROMPT)
    conv.append_message(conv.roles[1], "A cat.")
    conv.append_message(conv.roles[0], "What colour is it?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        "<|system|>\n" + SYS + "<|end|>"
        "<|user|>\n<image>\n" + PROMPT + "<|end|>"
        "<|assistant|>\nA cat.<|end|>"
        "<|user|>\nWhat colour is it?<|end|>"
        "<|assistant|>\n"
    )
    assert conv.sep.strip() == "<|end|>"


def test_internvl2_5_rendering_has_newline_after_im_end():
    conv = get_conv_template("internvl2_5")
    conv.append_message(conv.roles[0], "Hi")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        "<|im_start|>system\n" + SYS_2_5 + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert conv.sep.strip() == "<|im_end|>"


def test_registry_hands_out_independent_copies():
    conv = get_conv_template("internlm2-chat")
    conv.append_message(conv.roles[0], "x")
    conv.set_system_message("changed")
    fresh = get_conv_template("internlm2-chat")
    assert fresh.messages == [] and fresh.system_message == SYS
    copied = conv.copy()
    copied.append_message(copied.roles[1], "y")
    assert len(conv.messages) == 1 and len(copied.messages) == 2
    with pytest.raises(KeyError, match="internlm2-chat"):
        get_conv_template("no-such-template")
    with pytest.raises(ValueError):
        conversation.register_conv_template(conversation.conv_templates["Hermes-2"])


def test_multi_turn_and_empty_message_rendering():
    conv = get_conv_template("internlm2-chat")
    conv.set_system_message("S")
    conv.append_message(conv.roles[0], "q1")
    conv.append_message(conv.roles[1], "a1")
    conv.append_message(conv.roles[0], "q2")
    conv.append_message(conv.roles[1], "")
    assert conv.get_prompt() == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nq1<|im_end|><|im_start|>assistant\na1<|im_end|>"
        "<|im_start|>user\nq2<|im_end|><|im_start|>assistant\n"
    )
    conv.update_last_message("a2")
    assert conv.get_prompt().endswith("assistant\na2<|im_end|>")


# ---------------------------------------------------------------- tiny tokenizer
def training_texts():
    conv = get_conv_template("internlm2-chat")
    return CAPTIONS + [PROMPT, conv.system_message, conv.system_template, *conv.roles, conv.sep]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tok")
    build_tiny_tokenizer(out, training_texts(), vocab_size=512)
    return out


@pytest.fixture()
def tok(tiny_dir):
    return InternLM2Tokenizer.from_pretrained(tiny_dir)


def test_tiny_folder_looks_like_the_real_one(tiny_dir, tok):
    files = sorted(os.listdir(tiny_dir))
    for name in (
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenization_internlm2.py",
    ):
        assert name in files
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "InternLM2Tokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["pad_token"] == "</s>"
    n = tok.vocab_size
    decoder = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()}
    expected = {0: "<unk>", 1: "<s>", 2: "</s>"}
    expected.update({n - 6 + i: t for i, t in enumerate(INTERNLM2_CHAT_TOKENS)})
    expected.update({n + i: t for i, t in enumerate(INTERNVL2_TOKENS)})
    assert decoder == expected
    assert all(v["special"] for v in config["added_tokens_decoder"].values())
    added = json.loads((tiny_dir / "added_tokens.json").read_text(encoding="utf-8"))
    assert added == {t: n + i for i, t in enumerate(INTERNVL2_TOKENS)}
    special_map = json.loads((tiny_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["bos_token"] == "<s>" and special_map["pad_token"] == "</s>"
    assert "<|im_end|>" in special_map["additional_special_tokens"]
    assert (tiny_dir / "tokenization_internlm2.py").read_bytes() == (
        MODEL_DIR / "tokenization_internlm2.py"
    ).read_bytes()


def test_tiny_ids_follow_internlm2_layout(tok):
    n = tok.vocab_size
    assert 300 <= n <= 1000
    assert len(tok) == n + 9
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [n - 2, n - 1]
    assert tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]) == [n, n + 1, n + 2]
    # the chat tokens are real pieces of the sentencepiece model
    assert tok.sp_model.id_to_piece(n - 2) == "<|im_end|>"
    # re-adding the InternVL tokens (what the fine-tune script does) adds nothing
    assert tok.add_tokens(list(INTERNVL2_TOKENS), special_tokens=True) == 0


def test_special_tokens_are_single_ids_and_bos_is_prepended(tok):
    for token in INTERNLM2_CHAT_TOKENS + INTERNVL2_TOKENS:
        ids = tok(token).input_ids
        assert ids == [1, tok.convert_tokens_to_ids(token)], token
        assert tok("x" + token + "y", add_special_tokens=False).input_ids.count(tok.convert_tokens_to_ids(token)) == 1
    assert tok("a dog").input_ids[0] == 1
    assert tok("a dog").input_ids.count(1) == 1
    assert tok("a dog").input_ids[-1] != 2  # no EOS


def test_image_tokens_have_no_spaces_between(tok):
    text = "<img><IMG_CONTEXT><IMG_CONTEXT></img>"
    ids = tok(text, add_special_tokens=False).input_ids
    n = tok.vocab_size
    assert ids == [n, n + 2, n + 2, n + 1]
    assert tok.convert_ids_to_tokens(ids) == ["<img>", "<IMG_CONTEXT>", "<IMG_CONTEXT>", "</img>"]
    assert tok.decode(ids) == text


def test_decode_skip_special_tokens_drops_them(tok):
    _, prompt = caption_sample(n_context=3)
    ids = tok(prompt).input_ids
    full = tok.decode(ids)
    assert full == "<s>" + prompt
    clean = tok.decode(ids, skip_special_tokens=True)
    for token in ("<s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"):
        assert token not in clean
    assert clean == "system\n" + SYS + "user\n\n" + PROMPT + "assistant\n" + CAPTION.strip()


def test_system_message_round_trips(tok):
    ids = tok(SYS).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == SYS
    assert tok.unk_token_id not in ids


def test_byte_fallback_encodes_unseen_text(tmp_path):
    t = build_tiny_tokenizer(tmp_path / "en_only", CAPTIONS, vocab_size=400)
    for text in (SYS, SYS_2_5, "naïve café ✓ 🙂 tab\there", "  two  spaces\n\nnewlines"):
        ids = t(text, add_special_tokens=False).input_ids
        assert t.unk_token_id not in ids
        assert t.decode(ids) == text


def test_left_padded_batch(tok):
    tok.padding_side = "left"
    texts = ["a dog", CAPTIONS[1], "<|im_start|>user\n" + PROMPT + "<|im_end|>"]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    for row, text in enumerate(texts):
        single = tok(text).input_ids
        width = ids.shape[1]
        assert ids[row, width - len(single) :].tolist() == single
        assert ids[row, : width - len(single)].tolist() == [2] * (width - len(single))
        assert mask[row].tolist() == [0] * (width - len(single)) + [1] * len(single)
        assert ids[row, width - len(single)].item() == 1  # BOS right after the padding


def _masked_counts(tok, conv, prompt):
    """The label-masking arithmetic of FORMAT.md §4.3 (preprocess_internlm)."""
    total = len(tok(prompt).input_ids)
    user, assistant = conv.roles
    chunks = prompt.split(assistant)
    cur = 1  # BOS
    supervised = []
    cur += len(tok(chunks[0] + assistant).input_ids) - 1
    for chunk in chunks[1:-1]:
        answer, rest = chunk.split(user, 1)
        n = len(tok(answer).input_ids) - 1
        supervised.append((cur, cur + n))
        cur += n
        cur += len(tok(user + rest + assistant).input_ids) - 1
    n = len(tok(chunks[-1]).input_ids) - 1
    supervised.append((cur, cur + n))
    cur += n
    return total, cur, supervised


@pytest.mark.parametrize("caption", CAPTIONS)
def test_piecewise_token_counts_sum_to_whole(tok, caption):
    conv, prompt = caption_sample(caption=caption, n_context=5)
    total, counted, spans = _masked_counts(tok, conv, prompt)
    assert counted == total
    ids = tok(prompt).input_ids
    ((start, end),) = spans
    assert tok.decode(ids[start:end]) == caption.strip() + "<|im_end|>"


def test_piecewise_counts_multi_turn(tok):
    conv = get_conv_template("internlm2-chat")
    conv.append_message(conv.roles[0], "<image>\n" + PROMPT)
    conv.append_message(conv.roles[1], CAPTIONS[1])
    conv.append_message(conv.roles[0], "What is the dog doing?")
    conv.append_message(conv.roles[1], "It runs across the grass.")
    prompt = conv.get_prompt().replace("<image>", "<img>" + "<IMG_CONTEXT>" * 4 + "</img>", 1)
    total, counted, spans = _masked_counts(tok, conv, prompt)
    assert counted == total
    ids = tok(prompt).input_ids
    assert [tok.decode(ids[a:b]) for a, b in spans] == [
        CAPTIONS[1] + "<|im_end|>",
        "It runs across the grass.<|im_end|>",
    ]


def test_build_is_deterministic(tmp_path, tiny_dir):
    build_tiny_tokenizer(tmp_path / "again", training_texts(), vocab_size=512)
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    assert (tmp_path / "again" / "tokenizer_config.json").read_text() == (
        tiny_dir / "tokenizer_config.json"
    ).read_text()


def test_save_reload_in_process(tmp_path, tok):
    tok.save_pretrained(tmp_path / "resaved")
    again = InternLM2Tokenizer.from_pretrained(tmp_path / "resaved")
    _, prompt = caption_sample(n_context=2)
    assert again(prompt).input_ids == tok(prompt).input_ids
    assert len(again) == len(tok)


# ------------------------------------------------ a folder laid out like InternVL2-2B
def make_real_layout_folder(out: Path) -> int:
    """A tokenizer folder with the InternVL2-2B structure: the sp model ends with six
    [UNUSED_TOKEN_141..146] pieces that tokenizer_config.json re-labels as the chat
    tokens, then nine added InternVL tokens; only the six chat tokens are listed as
    additional special tokens. Returns the sp vocab size."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(_train_sp_model(CAPTIONS + [PROMPT, SYS, "user\nassistant\nsystem\n"], 400))
    for k in range(141, 147):
        piece = proto.pieces.add()
        piece.piece = f"[UNUSED_TOKEN_{k}]"
        piece.score = 0.0
        piece.type = pb.ModelProto.SentencePiece.USER_DEFINED
    n = len(proto.pieces)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())

    def entry(content):
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    decoder = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>")}
    decoder.update({str(n - 6 + i): entry(t) for i, t in enumerate(INTERNLM2_CHAT_TOKENS)})
    decoder.update({str(n + i): entry(t) for i, t in enumerate(INTERNVL2_TOKENS)})
    chat_specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|action_start|>",
        "<|action_end|>",
        "<|interpreter|>",
        "<|plugin|>",
    ]
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": chat_specials,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    special_map = {
        "additional_special_tokens": chat_specials,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps({t: n + i for i, t in enumerate(INTERNVL2_TOKENS)}))
    shutil.copyfile(MODEL_DIR / "tokenization_internlm2.py", out / "tokenization_internlm2.py")
    return n


def test_real_layout_folder_loads(tmp_path):
    n = make_real_layout_folder(tmp_path / "InternVL2-2B-like")
    tok = InternLM2Tokenizer.from_pretrained(tmp_path / "InternVL2-2B-like")
    assert tok.vocab_size == n and len(tok) == n + 9
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "<img>", "<IMG_CONTEXT>", "</box>"]) == [
        n - 2,
        n - 1,
        n,
        n + 2,
        n + 8,
    ]
    assert tok.convert_ids_to_tokens(n - 2) == "<|im_end|>"
    assert tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]") == n - 2
    _, prompt = caption_sample(n_context=3)
    ids = tok(prompt).input_ids
    assert ids[:2] == [1, n - 1] and ids[-1] == n - 2
    assert ids.count(n + 2) == 3
    assert tok.decode(ids) == "<s>" + prompt
    clean = tok.decode(ids, skip_special_tokens=True)
    assert "<img>" not in clean and "<IMG_CONTEXT>" not in clean and "<|im_end|>" not in clean
    total, counted, _ = _masked_counts(tok, get_conv_template("internlm2-chat"), prompt)
    assert counted == total


# --------------------------------------------------- fresh process, remote code, offline
_LOADER = r"""
import json, sys
from transformers import AutoTokenizer
texts = json.loads(sys.argv[1])
out = {}
for folder in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    tok.padding_side = "left"
    batch = tok(texts[:2], padding=True)
    out[folder] = {
        "class": type(tok).__name__,
        "module": type(tok).__module__,
        "ids": [tok(t).input_ids for t in texts],
        "batch": batch["input_ids"],
        "decoded": tok.decode(tok(texts[-1]).input_ids, skip_special_tokens=True),
    }
print("RESULT" + json.dumps(out))
"""


def test_reload_in_fresh_process_with_remote_code(tmp_path, tiny_dir, tok):
    real_like = tmp_path / "InternVL2-2B-like"
    make_real_layout_folder(real_like)
    _, prompt = caption_sample(n_context=4)
    texts = ["a dog", CAPTIONS[0], prompt, SYS]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRANSFORMERS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(texts), str(tiny_dir), str(real_like)],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])

    tiny = result[str(tiny_dir)]
    assert tiny["class"] == "InternLM2Tokenizer"
    assert tiny["module"].startswith("transformers_modules"), tiny["module"]  # the copied file ran
    assert tiny["ids"] == [tok(t).input_ids for t in texts]
    tok.padding_side = "left"
    assert tiny["batch"] == tok(texts[:2], padding=True)["input_ids"]
    assert tiny["decoded"] == SYS

    real = result[str(real_like)]
    in_process = InternLM2Tokenizer.from_pretrained(real_like)
    assert real["module"].startswith("transformers_modules")
    assert real["ids"] == [in_process(t).input_ids for t in texts]
    assert real["decoded"] == SYS
