"""Conversation -> token ids and labels, as the original's preprocessing of the run's template computes them.

Only assistant answers and the separator that closes them (`<|im_end|>`) are supervised; BOS, the system prompt,
user turns, image tokens and role headers are -100. Two ways, as formats.ConversationRules says per template:
InternVL2's templates tokenise the whole rendered conversation and find the answers by counting each part's
tokens; `internvl2_5` tokenises each turn on its own (BOS, where the tokenizer adds one, once at the start) and
also leaves the newline after each answer's `<|im_end|>` unsupervised.

Speed without changing the result: every `<image>` is rendered as <img><IMG_CONTEXT></img> with a single
context token and expanded to 256 x tiles copies at the id level. Added tokens are atomic in the tokenizer, so
this is identical to tokenizing the fully expanded string, and it is ~2000x less text to tokenize.
"""

from dataclasses import dataclass

import torch

from ..model.conversation import (
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    get_conv_template,
)
from .formats import SampleError, clean_conversation, conversation_rules

IGNORE_INDEX = -100
# An <image> as tokenised: one context token, expanded to num_image_token x tiles copies at the id level.
COLLAPSED_IMAGE = IMG_START_TOKEN + IMG_CONTEXT_TOKEN + IMG_END_TOKEN


@dataclass
class TokenizedSample:
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, IGNORE_INDEX where not supervised
    attention_mask: torch.Tensor  # [L] bool
    position_ids: torch.Tensor  # [L] int64
    mismatch: bool = False  # the piecewise token count disagreed with the whole: labels all ignored

    def as_dict(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


class ConversationTokenizer:
    """Renders a conversation with a chat template and tokenizes it with the original's label mask."""

    def __init__(
        self,
        tokenizer,
        template_name: str,
        num_image_token: int,
        max_seq_length: int,
        system_message: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.template_name = template_name
        self.rules = conversation_rules(template_name)
        self.num_image_token = num_image_token
        self.max_seq_length = max_seq_length
        self.system_message = system_message
        self.context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        self.end_id = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.add_bos = len(self._ids("")) > 0  # does tokenizer(text) prepend BOS?
        template = get_conv_template(template_name)
        self.user_role, self.assistant_role = template.roles
        self.sep = template.sep
        self.system_template = template.system_template
        self.bos_id = tokenizer.bos_token_id
        self.header_length = self._count(self.assistant_role)  # the assistant header's tokens, masked in answers
        self._default_system_ids: list[int] | None = None  # the template's system piece, tokenised once

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _system_ids(self, system_message: str) -> list[int]:
        return self._piece_ids(self.system_template.format(system_message=system_message) + self.sep)

    def _piece_ids(self, text: str) -> list[int]:
        """Tokens of `text` tokenised alone, without the BOS the tokenizer prepends."""
        return self._ids(text)[1 if self.add_bos else 0 :]

    def _count(self, text: str) -> int:
        """Tokens of `text` without the BOS the tokenizer prepends (the original's len(tok(x)) - 1)."""
        return len(self._ids(text)) - (1 if self.add_bos else 0)

    def _system_message(self, system: str | None) -> str:
        """The line's own system message, else the one this tokenizer was given, else the template's."""
        if system is not None:
            return system
        if self.system_message is not None:
            return self.system_message
        return get_conv_template(self.template_name).system_message

    def render(self, turns: list[tuple[str, str]], system: str | None = None) -> str:
        template = get_conv_template(self.template_name)
        template.system_message = self._system_message(system)
        for role, text in turns:
            template.append_message(self.user_role if role == "human" else self.assistant_role, text)
        return template.get_prompt()

    def _expanded_count(self, text: str, tiles: list[int]) -> tuple[int, int]:
        """(tokens of text with each image expanded, number of images in text)."""
        images = text.count(IMG_CONTEXT_TOKEN)
        return self._count(text) + sum((self.num_image_token * n - 1) for n in tiles[:images]), images

    def __call__(self, conversations: list[dict], num_tiles: list[int]) -> TokenizedSample:
        """num_tiles: tiles of each image, in the order the <image> placeholders appear."""
        conversation = clean_conversation(conversations, self.rules)
        return self.encode(conversation.turns, num_tiles, conversation.system)

    def _expand_images(self, ids: list[int], num_tiles: list[int]) -> list[int]:
        """Each collapsed image's single context token as num_image_token x its tiles copies."""
        expanded, image_index = [], 0
        for token in ids:
            if token == self.context_id:
                expanded.extend([token] * (self.num_image_token * num_tiles[image_index]))
                image_index += 1
            else:
                expanded.append(token)
        return expanded

    def encode(self, turns: list[tuple[str, str]], num_tiles: list[int], system: str | None = None) -> TokenizedSample:
        """A conversation already cleaned (formats.clean_conversation: (human | gpt, text) turns, and the line's own
        system message if the rules kept one)."""
        placeholders = self.rules.placeholders(turns)
        if placeholders != len(num_tiles):
            raise SampleError(f"{placeholders} <image> placeholders for {len(num_tiles)} images")
        if self.rules.turn_by_turn:
            expanded, labels = self._encode_turn_by_turn(turns, num_tiles, system)
            mismatch = False
        else:
            rendered = self.render(turns, system).replace(IMAGE_PLACEHOLDER, COLLAPSED_IMAGE)
            expanded = self._expand_images(self._ids(rendered), num_tiles)
            labels, mismatch = self._labels(rendered, expanded, num_tiles)

        if len(expanded) > self.max_seq_length:
            cut = expanded[self.max_seq_length :]
            if self.context_id in cut or self.end_id in cut:
                raise SampleError(
                    f"{len(expanded)} tokens do not fit max_seq_length {self.max_seq_length} "
                    f"without cutting image tokens"
                )
            # text-only overflow: right truncation, as the original tokenizer call does
            expanded, labels = expanded[: self.max_seq_length], labels[: self.max_seq_length]

        input_ids = torch.tensor(expanded, dtype=torch.long)
        attention_mask = input_ids.ne(self.pad_id)
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(~attention_mask, 1)
        return TokenizedSample(
            input_ids, torch.tensor(labels, dtype=torch.long), attention_mask, position_ids, mismatch
        )

    def _encode_turn_by_turn(
        self, turns: list[tuple[str, str]], num_tiles: list[int], system: str | None
    ) -> tuple[list[int], list[int]]:
        """The original's preprocess_internvl2_5: the system message and each turn tokenised on its own and
        concatenated; in an answer, its assistant header and the newline after its `<|im_end|>` are masked."""
        if system is None and self._default_system_ids is None:  # the same for every line without its own
            self._default_system_ids = self._system_ids(self._system_message(None))
        system_ids = self._default_system_ids if system is None else self._system_ids(system)
        ids = ([self.bos_id] if self.add_bos else []) + system_ids
        labels = [IGNORE_INDEX] * len(ids)
        header, images = self.header_length, 0
        for role, text in turns:
            if role == "human":  # <image> stands for a picture in questions only
                piece = self.user_role + text.replace(IMAGE_PLACEHOLDER, COLLAPSED_IMAGE) + self.sep
            else:
                piece = self.assistant_role + text + self.sep
            piece_ids = self._piece_ids(piece)
            used = piece_ids.count(self.context_id)
            piece_ids = self._expand_images(piece_ids, num_tiles[images : images + used])
            images += used
            ids += piece_ids
            if role == "gpt":
                labels += [IGNORE_INDEX] * header + piece_ids[header:-1] + [IGNORE_INDEX]
            else:
                labels += [IGNORE_INDEX] * len(piece_ids)
        return ids, labels

    def _labels(self, rendered: str, ids: list[int], num_tiles: list[int]) -> tuple[list[int], bool]:
        """The original's counting: mask everything up to and including each assistant header, keep each
        answer + separator, mask each following user turn. A piecewise count that disagrees with the whole
        masks the entire sample (the original's 'tokenization mismatch')."""
        labels = list(ids)
        total = sum(1 for token in ids if token != self.pad_id)
        cursor = 1 if self.add_bos else 0
        labels[:cursor] = [IGNORE_INDEX] * cursor
        parts = rendered.split(self.assistant_role)
        tiles = list(num_tiles)

        def mask(count):
            nonlocal cursor
            labels[cursor : cursor + count] = [IGNORE_INDEX] * len(labels[cursor : cursor + count])
            cursor += count

        count, used = self._expanded_count(parts[0] + self.assistant_role, tiles)
        tiles = tiles[used:]
        mask(count)
        for middle in parts[1:-1]:
            answer, user_part = middle.split(self.user_role, 1)
            cursor += self._count(answer)
            count, used = self._expanded_count(self.user_role + user_part + self.assistant_role, tiles)
            tiles = tiles[used:]
            mask(count)
        cursor += self._count(parts[-1])
        labels[cursor:] = [IGNORE_INDEX] * len(labels[cursor:])
        mismatch = cursor < self.max_seq_length and cursor != total
        if mismatch:
            labels = [IGNORE_INDEX] * len(labels)
        return labels, mismatch
