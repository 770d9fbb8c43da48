"""The files beside the weights that the original InternVL2 checkpoints carry for other tools: the tokenizer's
`chat_template` and `generation_config.json` with the list of stop tokens, which serving engines (vLLM, LMDeploy)
read; every folder this repository writes (the tiny models, Trainer checkpoints and outputs, merges) gets them
through complete_checkpoint_files. (The third, the three-entry `auto_map`, comes with every save of
InternVLChatConfig.)

The InternVL2 values are the originals' per LLM family (InternLM2: 2B, 8B, 26B; Qwen2: 1B; Phi-3: 4B), as
tests/fixtures/reference/TOKENIZER_CONFIGS.md records them. The Llama-based sizes (40B, 76B) have no known
chat_template here: their folders keep whatever their tokenizer brings. None of these templates builds the prompt
that chat() builds (no InternVL system message, other newlines): that is how the originals are.

The internvl2_5 generation (InternVL2.5, InternVL3) gets a chat_template that builds chat()'s prompt exactly (the
template's system message unless the messages bring one, a newline after every `<|im_end|>`; InternLM2.5's BOS in
front), and the stop tokens of its LLM family as eos_token_id: <|im_end|> and <|im_start|>, as the InternVL2.5
originals list them (InternVL3's own generation_config.json names none, so an engine reading it would stop only at
<|endoftext|>).
"""

import json
from pathlib import Path

import transformers

from ..model.conversation import get_conv_template

INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n'"
    " }}{% endif %}"
)
PHI3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
    "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)


def _chatml_chat_template(template_name: str) -> str:
    """A ChatML chat_template giving the prompt the conversation template renders (model/conversation.py, the one
    place for its strings): its system block unless the messages bring one, each message closed by its separator,
    and the assistant header as the generation prompt."""
    template = get_conv_template(template_name)
    system = template.system_template.format(system_message=template.system_message) + template.sep
    return (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
        + repr(system)
        + " }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        + repr(template.sep)
        + " }}{% endfor %}{% if add_generation_prompt %}{{ "
        + repr(template.roles[1])
        + " }}{% endif %}"
    )


INTERNVL2_5_CHAT_TEMPLATE = _chatml_chat_template("internvl2_5")
CHAT_TEMPLATES = {
    "InternLM2ForCausalLM": INTERNLM2_CHAT_TEMPLATE,
    "Qwen2ForCausalLM": QWEN2_CHAT_TEMPLATE,
    "Phi3ForCausalLM": PHI3_CHAT_TEMPLATE,
}
# The tokens whose ids the originals' generation_config.json lists as eos_token_id (8B: [92542, 92543]; 1B:
# [151644, 151645]; 4B: [2, 32000, 32007]); by name, so that a tokenizer with other ids (the tiny one) gets its own.
STOP_TOKENS = {
    "InternLM2ForCausalLM": ("<|im_end|>", "<|im_start|>"),
    "Qwen2ForCausalLM": ("<|im_start|>", "<|im_end|>"),
    "Qwen3ForCausalLM": ("<|im_start|>", "<|im_end|>"),  # as the Qwen2.5 generations'; the 3.5 files not seen
    "Phi3ForCausalLM": ("</s>", "<|endoftext|>", "<|end|>"),
}


def chat_template_of(config: dict) -> str | None:
    """The chat_template a checkpoint of this config carries: by its generation's template, then its LLM family."""
    family = llm_family(config)
    if config.get("template") == "internvl2_5":
        return ("{{ bos_token }}" if family == "InternLM2ForCausalLM" else "") + INTERNVL2_5_CHAT_TEMPLATE
    return CHAT_TEMPLATES.get(family)


def llm_family(config: dict) -> str | None:
    architectures = (config.get("llm_config") or {}).get("architectures") or [None]
    return architectures[0]


def stop_token_ids(family: str | None, tokenizer) -> list[int]:
    """The family's stop tokens that this tokenizer has, as ids, in the originals' order."""
    ids = []
    for token in STOP_TOKENS.get(family, ()):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    return ids


def complete_checkpoint_files(folder: str | Path, tokenizer=None) -> None:
    """Give a saved checkpoint folder what the originals carry beside their weights, keeping what it has: the
    family's chat_template in tokenizer_config.json (where the originals keep it; moved there from
    chat_template.jinja, which transformers 5 writes instead), and, given the tokenizer, generation_config.json with
    the family's stop tokens as eos_token_id when it names none or one."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    family = llm_family(config)

    tokenizer_config_path = folder / "tokenizer_config.json"
    if tokenizer_config_path.is_file():
        tokenizer_config = json.loads(tokenizer_config_path.read_text())
        jinja = folder / "chat_template.jinja"
        template = tokenizer_config.get("chat_template")
        if template is None and jinja.is_file():
            template = jinja.read_text()
        if template is None:
            template = chat_template_of(config)
        if template is not None and tokenizer_config.get("chat_template") != template:
            tokenizer_config["chat_template"] = template
            tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
        if jinja.is_file() and tokenizer_config.get("chat_template") == jinja.read_text():
            jinja.unlink()  # one copy, where the originals have it

    if tokenizer is None:
        return
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    eos = generation.get("eos_token_id")
    stops = stop_token_ids(family, tokenizer)
    if stops and not isinstance(eos, list):
        generation = {"_from_model_config": True, **generation, "eos_token_id": stops}
        generation.setdefault("transformers_version", transformers.__version__)
        generation_path.write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
