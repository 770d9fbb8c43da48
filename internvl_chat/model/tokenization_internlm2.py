"""InternLM2Tokenizer: the slow sentencepiece tokenizer of InternLM2 / InternVL2.

Self-contained (sentencepiece + transformers only): the file is copied into
checkpoints and loaded as remote code through the ``auto_map`` entry
``tokenization_internlm2.InternLM2Tokenizer``.

Behaviour kept from the original tokenizer:

* the vocabulary file is ``tokenizer.model``; ``vocab_size`` is the number of
  sentencepiece pieces (92544 for InternLM2); added tokens live above it
  (InternVL2: ``<img>`` .. ``</box>`` = 92544..92552);
* every encoded sequence starts with BOS ``<s>`` (``add_bos_token=True``), no EOS
  is appended (``add_eos_token=False``); the pad token is ``</s>``;
* text between added tokens is handed to sentencepiece unchanged, so whether a
  dummy "▁" prefix is added is decided by the sp model itself
  (``normalizer_spec.add_dummy_prefix``);
* runs of sentencepiece pieces are decoded by sentencepiece and then passed
  through ``clean_up_tokenization`` (" ." -> "." etc.), as the original did.

Differences, on purpose: added/special tokens are written back literally when
decoding (no space is inserted before them), so ``decode(encode(text))`` gives
``text`` back; added tokens flagged ``special`` are treated as special tokens
(``decode(..., skip_special_tokens=True)`` drops ``<img>``/``<IMG_CONTEXT>`` even
when the config lists only the chat tokens as additional special tokens); and
``save_pretrained`` also writes ``special_tokens_map.json`` and keeps
``add_bos_token``/``add_eos_token`` in ``tokenizer_config.json``, which
transformers 5 would otherwise drop.
"""

import json
import os
from shutil import copyfile
from typing import Any

import sentencepiece as spm
from transformers.tokenization_utils import PreTrainedTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class InternLM2Tokenizer(PreTrainedTokenizer):
    """Sentencepiece (BPE, byte fallback) tokenizer with InternLM2 conventions."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        decode_with_prefix_space: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        # The sp model has to exist before the base __init__ runs: it calls
        # get_vocab() while registering the special tokens.
        self.vocab_file = vocab_file
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space
        self.sp_model = self._load_sp_model(vocab_file=vocab_file)
        self._sp_vocab_cache: dict[str, int] | None = None
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=sp_model_kwargs,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            decode_with_prefix_space=decode_with_prefix_space,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self._promote_special_added_tokens()

    # ------------------------------------------------------------------ loading
    def _load_sp_model(self, vocab_file: str | None = None, proto: bytes | None = None):
        processor = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        if proto is not None:
            processor.LoadFromSerializedProto(proto)
        else:
            if not vocab_file or not os.path.isfile(vocab_file):
                raise FileNotFoundError(f"sentencepiece model not found: {vocab_file!r}")
            processor.Load(vocab_file)
        return processor

    def _promote_special_added_tokens(self) -> None:
        """Make every added token flagged ``special`` a special token of this tokenizer."""
        known = set(self.all_special_tokens)
        for _, token in sorted(self._added_tokens_decoder.items()):
            if token.special and token.content not in known:
                self._extra_special_tokens.append(token)
                known.add(token.content)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        proto = state.pop("_sp_model_proto", None)
        self.__dict__.update(state)
        self.sp_model = self._load_sp_model(vocab_file=self.vocab_file, proto=proto)

    # --------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (added tokens not included)."""
        return self.sp_model.get_piece_size()

    def _sp_vocab(self) -> dict[str, int]:
        if self._sp_vocab_cache is None:
            self._sp_vocab_cache = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        return self._sp_vocab_cache

    def get_vocab(self) -> dict[str, int]:
        # Pieces whose id is re-labelled by an added token (InternLM2 stores
        # <|im_end|> as the piece [UNUSED_TOKEN_145]) appear under the added name only.
        overridden = set(self._added_tokens_decoder)
        vocab = {piece: idx for piece, idx in self._sp_vocab().items() if idx not in overridden}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self.vocab_size:
            return self.sp_model.id_to_piece(index)
        return str(self.unk_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decode runs of sp pieces with sentencepiece; added tokens are kept verbatim."""
        added = self._added_tokens_encoder
        pieces: list[str] = []
        out: list[str] = []

        def flush():
            if pieces:
                out.append(self.clean_up_tokenization(self.sp_model.decode(pieces)))
                pieces.clear()

        for token in tokens:
            if token in added:
                flush()
                out.append(token)
            else:
                pieces.append(token)
        flush()
        return "".join(out)

    # ----------------------------------------------------------- special tokens
    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        output = ([self.bos_token_id] if self.add_bos_token else []) + list(token_ids_0)
        if token_ids_1 is not None:
            output += list(token_ids_1)
        if self.add_eos_token:
            output.append(self.eos_token_id)
        return output

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(
                token_ids_0=token_ids_0, token_ids_1=token_ids_1, already_has_special_tokens=True
            )
        body = [0] * (len(token_ids_0) + (len(token_ids_1) if token_ids_1 is not None else 0))
        return ([1] if self.add_bos_token else []) + body + ([1] if self.add_eos_token else [])

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # ------------------------------------------------------------------- saving
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"vocabulary path ({save_directory}) should be a directory")
        out_vocab_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        same_file = os.path.abspath(self.vocab_file or "") == os.path.abspath(out_vocab_file)
        if not same_file and self.vocab_file and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out_vocab_file)
        elif not same_file or not os.path.isfile(out_vocab_file):
            with open(out_vocab_file, "wb") as handle:
                handle.write(self.sp_model.serialized_model_proto())
        return (out_vocab_file,)

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        filename_prefix = kwargs.get("filename_prefix")
        prefix = filename_prefix + "-" if filename_prefix else ""
        config_path = os.path.join(str(save_directory), prefix + "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
            config["add_bos_token"] = bool(self.add_bos_token)
            config["add_eos_token"] = bool(self.add_eos_token)
            with open(config_path, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        special_map = dict(self.special_tokens_map)
        extra = [str(token) for token in self._extra_special_tokens]
        if extra:
            special_map["additional_special_tokens"] = extra
        special_path = os.path.join(str(save_directory), prefix + "special_tokens_map.json")
        with open(special_path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(special_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return tuple(files) + (special_path,)
