"""Built from the original configs on the meta device, every size has exactly the original state_dict keys
and shapes, and the 2B LLM wrapped with LoRA r128 prints the tutorial's parameter line."""

import json

import pytest
import torch

from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig
from internvl_chat.model.modeling_internvl_chat import InternVLChatModel

SIZES = ["InternVL2-1B", "InternVL2-2B", "InternVL2-4B", "InternVL2-8B"]


def load_reference(reference_dir, name):
    return json.loads((reference_dir / "keys" / f"{name}.keys.json").read_text())


def build_on_meta(config_dict, **overrides):
    config = InternVLChatConfig(**{**config_dict, **overrides})
    with torch.device("meta"):
        return InternVLChatModel(config)


@pytest.mark.parametrize("name", SIZES)
def test_state_dict_keys_and_shapes(reference_dir, name):
    ref = load_reference(reference_dir, name)
    model = build_on_meta(ref["config"])
    ours = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert sorted(set(ours) - set(ref["keys"])) == []
    assert sorted(set(ref["keys"]) - set(ours)) == []
    assert ours == ref["keys"]
    assert len(ours) == ref["num_keys"]
    counts = {
        part: sum(p.numel() for p in getattr(model, part).parameters())
        for part in ("vision_model", "mlp1", "language_model")
    }
    counts["total"] = sum(counts.values())
    assert counts == ref["param_counts"]
    assert model.num_image_token == ref["num_image_token"]


def test_llm_lora_r128_parameter_line(reference_dir, capsys):
    ref = load_reference(reference_dir, "InternVL2-2B")
    lora = json.loads((reference_dir / "keys" / "InternVL2-2B.llm_lora_r128.json").read_text())
    model = build_on_meta(ref["config"], use_llm_lora=128)
    printed = capsys.readouterr().out.strip().splitlines()
    assert "trainable params: 125,829,120 || all params: 2,014,976,000 || trainable%: 6.2447" in printed
    llm_state = model.language_model.state_dict()
    lora_keys = {k: list(v.shape) for k, v in llm_state.items() if "lora_" in k}
    assert len(lora_keys) == lora["num_lora_keys"]
    for key, shape in lora["lora_keys_first_layer"].items():
        assert lora_keys[key] == shape
    for key in lora["llm_key_prefix_example"]:
        assert key in llm_state
    trainable = sum(p.numel() for p in model.language_model.parameters() if p.requires_grad)
    assert trainable == lora["trainable_params"]


@pytest.mark.parametrize("name", SIZES)
def test_presets_match_the_original_configs(reference_dir, name):
    from internvl_chat.checkpoint.presets import preset_config_dict

    ref = load_reference(reference_dir, name)
    model = build_on_meta(preset_config_dict(name))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["keys"]
    ours = InternVLChatConfig(**preset_config_dict(name))
    original = InternVLChatConfig(**ref["config"])
    for field in ("template", "downsample_ratio", "ps_version", "force_image_size", "use_thumbnail"):
        assert getattr(ours, field) == getattr(original, field)
    for field in ("rms_norm_eps", "num_key_value_heads", "max_position_embeddings", "rope_parameters", "rope_theta"):
        if hasattr(original.llm_config, field):  # transformers 5 configs keep rope_theta in rope_parameters
            assert getattr(ours.llm_config, field) == getattr(original.llm_config, field), field
