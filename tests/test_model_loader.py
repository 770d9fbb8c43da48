"""The checkpoint loader: sharded folders, clear errors for broken folders, the --auto device map, and the
KV cache accepted under both of its names."""

import json
import shutil

import pytest
import torch
from transformers.cache_utils import DynamicCache

from internvl_chat.checkpoint.folder import CheckpointError, check_checkpoint_folder
from internvl_chat.checkpoint.loader import load_model, split_model_device_map
from internvl_chat.checkpoint.presets import preset_config_dict
from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny") / "InternVL2-tiny", seed=5)


def test_sharded_checkpoint_loads_like_the_single_file(tiny, tmp_path):
    model = load_model(tiny, dtype=torch.float32, device="cpu")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="500KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = load_model(sharded, dtype=torch.float32, device="cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_broken_folders_give_errors_that_name_the_file(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        check_checkpoint_folder(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        check_checkpoint_folder(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        check_checkpoint_folder(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        check_checkpoint_folder(broken)


def test_missing_shard_is_reported(tiny, tmp_path):
    model = load_model(tiny, dtype=torch.float32, device="cpu")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="500KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard.name}"):
        check_checkpoint_folder(tmp_path / "sharded")


@pytest.mark.parametrize("name, gpus", [("InternVL2-26B", 2), ("InternVL2-76B", 4), ("InternVL2-8B", 8)])
def test_auto_device_map_places_every_layer(name, gpus):
    config = InternVLChatConfig(**preset_config_dict(name))
    device_map = split_model_device_map(config, gpus)
    layers = config.llm_config.num_hidden_layers
    placed = [device_map[f"language_model.model.layers.{i}"] for i in range(layers)]
    assert placed == sorted(placed[:-1]) + [0]  # in order, the last layer forced onto GPU 0
    assert set(placed[:-1]) <= set(range(gpus))
    per_gpu = [placed[:-1].count(g) for g in range(gpus)]
    assert per_gpu[0] < max(per_gpu)  # GPU 0 takes a smaller share: it also holds the ViT
    for module in ("vision_model", "mlp1", "language_model.model.norm"):
        assert device_map[module] == 0


def test_kv_cache_under_both_argument_names(tiny):
    model = load_model(tiny, dtype=torch.float32, device="cpu")
    llm = model.language_model
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        first = llm(input_ids=ids[:, :4], use_cache=True)
        old_name = llm(input_ids=ids[:, 4:], past_key_values=first.past_key_values, use_cache=True).logits
        first = llm(input_ids=ids[:, :4], use_cache=True)
        new_name = llm(input_ids=ids[:, 4:], cache=first.past_key_values, use_cache=True).logits
        no_cache = llm(input_ids=ids, use_cache=False).logits[:, 4:]
        wrong = llm(input_ids=ids[:, 4:], cache=DynamicCache(), use_cache=True).logits
    assert torch.allclose(old_name, no_cache, atol=1e-5)
    assert torch.allclose(new_name, no_cache, atol=1e-5)
    assert not torch.allclose(wrong, no_cache, atol=1e-3)
