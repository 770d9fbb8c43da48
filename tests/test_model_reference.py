"""The tiny checkpoint saved by the original implementation loads with no missing or unexpected keys and
reproduces the original's intermediate outputs (shared/reference/checkpoints/tiny_internlm2_reference)."""

import numpy as np
import pytest
import torch

from internvl_chat.model.modeling_internvl_chat import InternVLChatModel


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    expected = torch.from_numpy(expected).to(actual.dtype)
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def reference(reference_dir):
    folder = reference_dir / "checkpoints" / "tiny_internlm2_reference"
    arrays = dict(np.load(folder / "ref_outputs.npz"))
    return folder, arrays


def run_reference(folder, arrays, attn_implementation):
    model, info = InternVLChatModel.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation, output_loading_info=True
    )
    model.eval()
    model.img_context_token_id = 193  # <IMG_CONTEXT> in this checkpoint's added_tokens.json
    pixel_values = torch.from_numpy(arrays["pixel_values"])
    input_ids = torch.from_numpy(arrays["input_ids"]).long()
    attention_mask = torch.from_numpy(arrays["attention_mask"]).long()
    image_flags = torch.from_numpy(arrays["image_flags"]).long()
    with torch.no_grad():
        vit = model.vision_model(pixel_values=pixel_values).last_hidden_state
        vit_embeds = model.extract_feature(pixel_values)
        inputs_embeds, matched = model.embed_with_images(input_ids, vit_embeds[image_flags.reshape(-1) == 1])
        out = model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, output_hidden_states=True
        )
        full = model(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, image_flags=image_flags
        )
    assert matched
    return info, {
        "vit_last_hidden_state": vit,
        "vit_embeds": vit_embeds,
        "inputs_embeds": inputs_embeds,
        "logits": out.logits,
        "llm_hidden_states": torch.stack(out.hidden_states),
        "forward_logits": full.logits,
    }


def test_reference_loads_without_key_problems(reference):
    folder, arrays = reference
    info, _ = run_reference(folder, arrays, "eager")
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


@pytest.mark.parametrize("attn_implementation, tolerance", [("eager", 1e-5), ("sdpa", 1e-4)])
def test_reference_outputs(reference, attn_implementation, tolerance):
    folder, arrays = reference
    _, outputs = run_reference(folder, arrays, attn_implementation)
    outputs["logits_via_forward"] = outputs.pop("forward_logits")
    for name in ("vit_last_hidden_state", "vit_embeds", "inputs_embeds", "logits", "llm_hidden_states"):
        assert tuple(outputs[name].shape) == arrays[name].shape, name
        assert relative_error(outputs[name], arrays[name]) <= tolerance, (
            name,
            relative_error(outputs[name], arrays[name]),
        )
    assert relative_error(outputs["logits_via_forward"], arrays["logits"]) <= tolerance
    # the greedy choice at the last positions, as recorded in ref_outputs.json
    assert outputs["logits"][0, -8:].argmax(-1).tolist() == [26, 197, 116, 81, 78, 77, 25, 48]


def test_what_we_write_is_what_the_original_wrote(reference, tmp_path):
    """The reference checkpoint loaded and saved again by this repository: the same safetensors keys, shapes and
    values as the file the original code wrote, and a config.json with every field the original's has, at the same
    values (the original's loader then finds no missing or unexpected keys)."""
    import json

    from safetensors.torch import load_file

    folder, _ = reference
    model = InternVLChatModel.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(tmp_path / "again")
    ours, theirs = load_file(tmp_path / "again" / "model.safetensors"), load_file(folder / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    skip = {"_commit_hash", "transformers_version", "torch_dtype", "vision_config", "llm_config"}
    for key, value in original.items():
        if key not in skip:
            assert written[key] == value, key
    for part in ("vision_config", "llm_config"):
        for key in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key in original[part]:
                assert written[part][key] == original[part][key], (part, key)
