"""What the repository writes beside the weights is what the original checkpoints carry for other tools (serving
engines, AutoModelForCausalLM): the chat_template, the stop tokens of generation_config.json and the three-entry
auto_map (tests/fixtures/reference/serving_fields.json); and the remote code names the transformers it needs."""

import json
import re
import warnings
from pathlib import Path

import pytest

from internvl_chat.checkpoint.serving_files import CHAT_TEMPLATES, stop_token_ids
from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.model.configuration_internvl_chat import TESTED_TRANSFORMERS, check_transformers_version

REPO = Path(__file__).resolve().parents[1]
FACTS = json.loads((REPO / "tests/fixtures/reference/serving_fields.json").read_text())
FAMILIES = {"internlm2": "InternLM2ForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}


class OriginalVocabulary:
    """The originals' ids of the tokens that matter here, as a tokenizer would give them."""

    unk_token_id = 0

    def __init__(self, ids: dict):
        self.ids = ids

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.ids.get(token, self.unk_token_id)


@pytest.mark.parametrize("family", sorted(FACTS["families"]))
def test_the_originals_stop_tokens_and_templates(family):
    facts = FACTS["families"][family]
    assert CHAT_TEMPLATES[family] == facts["chat_template"]
    assert stop_token_ids(family, OriginalVocabulary(facts["token_ids"])) == facts["eos_token_id"]


@pytest.mark.parametrize("llm", sorted(FAMILIES))
def test_a_written_checkpoint_carries_the_originals_serving_fields(tmp_path, llm):
    folder = build_checkpoint(tmp_path / llm, llm=llm, seed=0)
    facts = FACTS["families"][FAMILIES[llm]]
    assert json.loads((folder / "config.json").read_text())["auto_map"] == FACTS["auto_map"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == facts["chat_template"]
    assert not (folder / "chat_template.jinja").exists()  # one copy, where the originals keep it
    from internvl_chat.checkpoint.loader import load_tokenizer

    tokenizer = load_tokenizer(folder)
    names = [token for token, _ in sorted(facts["token_ids"].items(), key=lambda item: item[1])]
    present = [token for token in names if tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id]
    want = [
        tokenizer.convert_tokens_to_ids(token)
        for original_id in facts["eos_token_id"]
        for token, token_id in facts["token_ids"].items()
        if token_id == original_id and token in present
    ]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == want
    messages = [{"role": "user", "content": "Describe the image."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(
            messages, chat_template=facts["chat_template"], tokenize=False, add_generation_prompt=True
        )
    )


def test_the_remote_code_names_the_transformers_it_needs():
    lowest, highest = TESTED_TRANSFORMERS
    with pytest.raises(ImportError, match=rf"needs transformers {lowest} or newer \(tested {lowest} to {highest}\)"):
        check_transformers_version("4.49.0")
    with pytest.warns(UserWarning, match=rf"tested with transformers {lowest} to {highest}; .* has 99.0.0"):
        check_transformers_version("99.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version(lowest)
        check_transformers_version(highest)
    # requirements.txt installs the same range
    requirement = re.search(r"^transformers(.*)$", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)
    assert requirement.split("#")[0].strip() == f">={lowest},<={highest}"
