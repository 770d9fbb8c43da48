"""Chat prompt templates of the InternVL2 family.

This module is deliberately self-contained (standard library only, no imports
from the surrounding package): it is copied verbatim next to
``modeling_internvl_chat.py`` into every checkpoint we write, and transformers
loads it from there as remote code, where no package context exists.

Only the templates the InternVL2 / InternVL2.5 checkpoints name in their
``config.json`` (``template``) are registered, and only the separator style they
use (MPT) is implemented. The rendered strings are byte-identical to the
original InternVL implementation:

* ``internlm2-chat``  InternVL2-2B, -8B, -26B and -Llama3-76B
* ``Hermes-2``        InternVL2-1B and -40B (same text as ``internlm2-chat``;
                      only the training pre-processing differs: no BOS)
* ``phi3-chat``       InternVL2-4B
* ``internvl2_5``     InternVL2.5 (newline after every ``<|im_end|>``)

MPT rendering: ``system_template.format(system_message) + sep``, then for every
message ``role + text + sep``, or just ``role`` when the text is empty/None
(that open assistant turn is the generation prompt).
"""

import dataclasses
from collections.abc import Sequence
from enum import IntEnum

__all__ = [
    "SeparatorStyle",
    "Conversation",
    "conv_templates",
    "register_conv_template",
    "get_conv_template",
    "INTERNVL2_SYSTEM_MESSAGE",
    "INTERNVL2_5_SYSTEM_MESSAGE",
    "IMG_START_TOKEN",
    "IMG_END_TOKEN",
    "IMG_CONTEXT_TOKEN",
    "IMAGE_PLACEHOLDER",
    "image_placeholder",
    "image_placeholder_collapsed",
    "INTERNVL_ADDED_TOKENS",
    "render",
]


class SeparatorStyle(IntEnum):
    """How turns are joined. The InternVL2 family only uses MPT."""

    MPT = 1


# The system prompt shared by internlm2-chat, Hermes-2 and phi3-chat (59 characters:
# a full-width comma after 大模型, an ASCII ", " after InternVL, a full-width full stop).
INTERNVL2_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

# The system prompt of the internvl2_5 template.
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


def _message_text(message) -> str | None:
    """A message may be a plain string or a tuple whose first item is the text."""
    if isinstance(message, tuple):
        return message[0] if message else None
    return message


@dataclasses.dataclass
class Conversation:
    """One prompt template plus the turns appended to it so far."""

    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    messages: list[list[str | None]] = dataclasses.field(default_factory=list)
    sep_style: SeparatorStyle = SeparatorStyle.MPT
    sep: str = "\n"
    sep2: str | None = None
    stop_str: str | list[str] | None = None
    stop_token_ids: list[int] | None = None

    # -- building -----------------------------------------------------------------
    def set_system_message(self, system_message: str) -> None:
        self.system_message = system_message

    def append_message(self, role: str, message: str | None) -> None:
        """Add a turn; ``message=None`` leaves the turn open (generation prompt)."""
        self.messages.append([role, message])

    def update_last_message(self, message: str | None) -> None:
        """Fill in the text of the last (usually open) turn."""
        self.messages[-1][1] = message

    # -- rendering ----------------------------------------------------------------
    def get_system_prompt(self) -> str:
        return self.system_template.format(system_message=self.system_message)

    def get_prompt(self) -> str:
        if self.sep_style == SeparatorStyle.MPT:
            parts = [self.get_system_prompt(), self.sep]
            for role, message in self.messages:
                text = _message_text(message)
                if text:
                    parts.extend((role, text, self.sep))
                else:
                    parts.append(role)
            return "".join(parts)
        raise ValueError(f"unsupported separator style {self.sep_style!r} in template {self.name!r}")

    # -- misc ---------------------------------------------------------------------
    def copy(self) -> "Conversation":
        """An independent copy (the message list is copied, turn by turn)."""
        return Conversation(
            name=self.name,
            system_template=self.system_template,
            system_message=self.system_message,
            roles=tuple(self.roles),
            messages=[[role, message] for role, message in self.messages],
            sep_style=self.sep_style,
            sep=self.sep,
            sep2=self.sep2,
            stop_str=self.stop_str,
            stop_token_ids=None if self.stop_token_ids is None else list(self.stop_token_ids),
        )

    def dict(self) -> dict[str, object]:
        return {
            "template_name": self.name,
            "system_message": self.system_message,
            "roles": self.roles,
            "messages": self.messages,
        }


# name -> template; get_conv_template hands out copies so callers can't mutate these.
conv_templates: dict[str, Conversation] = {}


def register_conv_template(template: Conversation, override: bool = False) -> None:
    if template.name in conv_templates and not override:
        raise ValueError(f"conversation template {template.name!r} is already registered")
    conv_templates[template.name] = template


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the registered template ``name``."""
    try:
        template = conv_templates[name]
    except KeyError:
        known = ", ".join(sorted(conv_templates))
        raise KeyError(f"unknown conversation template {name!r}; known templates: {known}") from None
    return template.copy()


def _chatml_roles() -> tuple[str, str]:
    return ("<|im_start|>user\n", "<|im_start|>assistant\n")


register_conv_template(
    Conversation(
        name="Hermes-2",
        system_template="<|im_start|>system\n{system_message}",
        system_message=INTERNVL2_SYSTEM_MESSAGE,
        roles=_chatml_roles(),
        sep_style=SeparatorStyle.MPT,
        sep="<|im_end|>",
        stop_str="<|endoftext|>",
    )
)

register_conv_template(
    Conversation(
        name="internlm2-chat",
        system_template="<|im_start|>system\n{system_message}",
        system_message=INTERNVL2_SYSTEM_MESSAGE,
        roles=_chatml_roles(),
        sep_style=SeparatorStyle.MPT,
        sep="<|im_end|>",
    )
)

register_conv_template(
    Conversation(
        name="phi3-chat",
        system_template="<|system|>\n{system_message}",
        system_message=INTERNVL2_SYSTEM_MESSAGE,
        roles=("<|user|>\n", "<|assistant|>\n"),
        sep_style=SeparatorStyle.MPT,
        sep="<|end|>",
    )
)

register_conv_template(
    Conversation(
        name="internvl2_5",
        system_template="<|im_start|>system\n{system_message}",
        system_message=INTERNVL2_5_SYSTEM_MESSAGE,
        roles=_chatml_roles(),
        sep_style=SeparatorStyle.MPT,
        sep="<|im_end|>\n",
    )
)


def render(template_name: str, turns: Sequence[tuple[str, str | None]], system_message: str | None = None) -> str:
    """Render ``turns`` = [(speaker, text), ...] with speaker 'user'/'human' or
    'assistant'/'gpt'; a final assistant turn with text None is the generation prompt."""
    conv = get_conv_template(template_name)
    if system_message is not None:
        conv.set_system_message(system_message)
    for speaker, text in turns:
        if speaker in ("user", "human"):
            role = conv.roles[0]
        elif speaker in ("assistant", "gpt"):
            role = conv.roles[1]
        else:
            raise ValueError(f"unknown speaker {speaker!r}; expected user/human or assistant/gpt")
        conv.append_message(role, text)
    return conv.get_prompt()


# Image placeholders: `<image>` in a prompt becomes <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>.
# Each is one token id; the model writes one image feature at every <IMG_CONTEXT> position.
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"


def image_placeholder(num_image_token: int, num_tiles: int) -> str:
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN


def image_placeholder_collapsed(query: str) -> str:
    """A rendered prompt with every image span shown as <image> again (for logs)."""
    return query.replace(IMG_CONTEXT_TOKEN, "").replace(IMG_START_TOKEN + IMG_END_TOKEN, IMAGE_PLACEHOLDER)


# The nine tokens InternVL adds to every LLM vocabulary (the fine-tune script's add_tokens), in id order.
INTERNVL_ADDED_TOKENS = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
