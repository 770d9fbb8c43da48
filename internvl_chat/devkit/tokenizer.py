"""Build small, real tokenizers locally: InternLM2-style sentencepiece, and Qwen2.5-style byte-level BPE.

The folder written by :func:`build_tiny_tokenizer` has the layout of the
InternVL2-2B tokenizer, only with a few hundred pieces instead of 92544:

* ``tokenizer.model`` -- sentencepiece BPE with byte fallback (any text
  encodes), ``<unk>``=0, ``<s>``=1, ``</s>``=2, no dummy "▁" prefix, whitespace
  kept as is; its last six pieces are the InternLM2 chat tokens
  ``<|plugin|> <|interpreter|> <|action_end|> <|action_start|> <|im_end|>
  <|im_start|>`` (92538..92543 in the real model);
* the nine InternVL2 tokens ``<img> </img> <IMG_CONTEXT> <quad> </quad> <ref>
  </ref> <box> </box>`` as special added tokens right after the sp vocabulary
  (92544..92552 in the real model);
* ``tokenizer_config.json`` (``tokenizer_class``, ``auto_map``,
  ``added_tokens_decoder``), ``special_tokens_map.json``, ``added_tokens.json``
  and a copy of ``tokenization_internlm2.py`` so that
  ``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`` works offline.

Training is single-threaded on the given texts and the result is byte-for-byte
reproducible for the same inputs.
"""

import io
import json
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from ..model.conversation import INTERNVL_ADDED_TOKENS
from ..model.tokenization_internlm2 import InternLM2Tokenizer

# In the order of their ids in the real InternLM2 model (92538..92543).
INTERNLM2_CHAT_TOKENS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
# The order InternLM2's tokenizer_config.json lists them as additional special tokens.
INTERNLM2_ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
)
INTERNVL2_TOKENS = INTERNVL_ADDED_TOKENS

_MIN_LEARNED_VOCAB = 300  # 256 byte pieces + <unk>/<s>/</s> + "\n" + room for characters


def _training_lines(texts: Iterable[str]) -> list[str]:
    """Lines to train on: special-token strings removed, split at newlines, no blanks."""
    lines: list[str] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}: {text!r}")
        for token in INTERNLM2_CHAT_TOKENS + INTERNVL2_TOKENS:
            text = text.replace(token, "\n")
        lines.extend(line for line in text.split("\n") if line.strip())
    if not lines:
        raise ValueError("build_tiny_tokenizer needs at least one non-empty text to train on")
    return lines


def _train_sp_model(lines: Sequence[str], vocab_size: int) -> bytes:
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(1234)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support every requested merge
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        user_defined_symbols=["\n"],
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return model.getvalue()


def _append_chat_pieces(proto_bytes: bytes) -> bytes:
    """Put the InternLM2 chat tokens at the very end of the sp vocabulary."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    existing = {piece.piece for piece in proto.pieces}
    for token in INTERNLM2_CHAT_TOKENS:
        if token in existing:
            raise ValueError(f"{token!r} was learned as a normal piece; remove it from the training texts")
        piece = proto.pieces.add()
        piece.piece = token
        piece.score = 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


def build_tiny_tokenizer(out_dir, texts: Iterable[str], vocab_size: int = 640) -> InternLM2Tokenizer:
    """Train a small InternLM2-style tokenizer on ``texts`` and save it to ``out_dir``.

    ``vocab_size`` is the size of the sentencepiece model including the six chat
    tokens; the learned part may come out smaller when the texts are too few to
    support that many merges. ``len(tokenizer) == tokenizer.vocab_size + 9``.
    Returns the tokenizer re-loaded from ``out_dir``.
    """
    learned = int(vocab_size) - len(INTERNLM2_CHAT_TOKENS)
    if learned < _MIN_LEARNED_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the byte-fallback model needs at least "
            f"{_MIN_LEARNED_VOCAB + len(INTERNLM2_CHAT_TOKENS)} pieces"
        )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    proto = _append_chat_pieces(_train_sp_model(_training_lines(texts), learned))
    vocab_file = os.path.join(out_dir, "tokenizer.model")
    with open(vocab_file, "wb") as handle:
        handle.write(proto)

    tokenizer = InternLM2Tokenizer(vocab_file=vocab_file, add_bos_token=True, add_eos_token=False)
    # Chat tokens already are sp pieces: this only marks them special (as in InternLM2's config).
    tokenizer.add_tokens(list(INTERNLM2_ADDITIONAL_SPECIAL_TOKENS), special_tokens=True)
    added = tokenizer.add_tokens(list(INTERNVL2_TOKENS), special_tokens=True)
    if added != len(INTERNVL2_TOKENS):
        raise RuntimeError(f"expected {len(INTERNVL2_TOKENS)} new InternVL2 tokens, got {added}")
    for offset, token in enumerate(INTERNVL2_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != tokenizer.vocab_size + offset:
            raise RuntimeError(f"{token} got id {token_id}, expected {tokenizer.vocab_size + offset}")

    tokenizer.register_for_auto_class("AutoTokenizer")
    tokenizer.save_pretrained(out_dir)
    return InternLM2Tokenizer.from_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------- Qwen2 (byte BPE)

# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, letters, single digits, punctuation runs,
# newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's special tokens in the order of their ids (151643..151664 in the real model); the InternVL tokens follow
# (151665..151673). Qwen2 (InternVL2-1B) has only the first three (InternVL tokens from 151646).
QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Qwen3's four more (151665..151668); the InternVL tokens follow at 151669 in InternVL3.5.
QWEN3_SPECIAL_TOKENS = QWEN2_5_SPECIAL_TOKENS + ("<tool_response>", "</tool_response>", "<think>", "</think>")


def build_tiny_qwen2_tokenizer(
    out_dir, texts: Iterable[str], vocab_size: int = 640, special_tokens: Sequence[str] = QWEN2_5_SPECIAL_TOKENS
):
    """Train a small Qwen2.5-style byte-level BPE tokenizer on ``texts`` and save it to ``out_dir`` as the Qwen2.5
    folders carry it (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json naming Qwen2Tokenizer): no BOS,
    eos ``<|im_end|>``, pad ``<|endoftext|>``, the special tokens (Qwen2.5's 22, or QWEN3_SPECIAL_TOKENS) right
    after the learned vocabulary and the nine InternVL tokens after them. Any text encodes (256 byte symbols).
    Returns the tokenizer re-loaded the way checkpoints load it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..checkpoint.loader import load_tokenizer

    model = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    model.normalizer = normalizers.NFC()
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    model.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    special_tokens = tuple(special_tokens)
    learned = int(vocab_size) - len(special_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=learned, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    model.train_from_iterator(_training_lines(texts), trainer)
    model.add_special_tokens(list(special_tokens) + list(INTERNVL2_TOKENS))
    base = model.get_vocab_size(with_added_tokens=False)
    for offset, token in enumerate(special_tokens + INTERNVL2_TOKENS):
        if model.token_to_id(token) != base + offset:
            raise RuntimeError(f"{token} got id {model.token_to_id(token)}, expected {base + offset}")

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    wrapper = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *INTERNVL2_TOKENS],
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    wrapper.save_pretrained(out_dir)
    model.model.save(out_dir)  # vocab.json and merges.txt, as the Qwen folders also carry them
    config_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    config["tokenizer_class"] = "Qwen2Tokenizer"
    with open(config_file, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, ensure_ascii=False)
    return load_tokenizer(out_dir)
