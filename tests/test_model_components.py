"""Pieces of the model checked against independent restatements of the original maths (FORMAT.md §1)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from internvl_chat.devkit.checkpoint import tiny_config_dict
from internvl_chat.model.configuration_internlm2 import InternLM2Config
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig
from internvl_chat.model.decoder_steps import ROWS_MASK_KEY_MULTIPLE, OutputRows, pad_keys_past_length
from internvl_chat.model.modeling_internlm2 import InternLM2Attention, InternLM2DecoderLayer, InternLM2RotaryEmbedding
from internvl_chat.model.modeling_internvl_chat import InternVLChatModel, pixel_shuffle


def original_pixel_shuffle(x, scale_factor=0.5, ps_version="v2"):
    """The original's sequence of view/permute calls, restated from FORMAT.md §1.3."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_matches_the_original_ops(version):
    x = torch.randn(3, 32, 32, 8)
    assert torch.equal(pixel_shuffle(x, 0.5, version), original_pixel_shuffle(x, 0.5, version))


def test_pixel_shuffle_v2_token_layout():
    x = torch.randn(1, 4, 4, 2)
    out = pixel_shuffle(x, 0.5, "v2")
    i, j = 1, 0
    expected = torch.cat(
        [x[0, 2 * i, 2 * j], x[0, 2 * i, 2 * j + 1], x[0, 2 * i + 1, 2 * j], x[0, 2 * i + 1, 2 * j + 1]]
    )
    assert torch.equal(out[0, i, j], expected)


def test_fused_wqkv_split_follows_the_grouped_layout():
    config = InternLM2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, bias=False)
    attention = InternLM2Attention(config, 0)
    hd, groups = 16, 2
    rows = torch.arange((4 + 2 * 2) * hd, dtype=torch.float32)
    q, k, v = attention.split_qkv(rows.view(1, 1, -1))
    # group g holds rows [q(2g), q(2g+1), k(g), v(g)], each hd rows
    for g in range(2):
        base = g * (groups + 2) * hd
        assert torch.equal(q[0, 2 * g, 0], rows[base : base + hd])
        assert torch.equal(q[0, 2 * g + 1, 0], rows[base + hd : base + 2 * hd])
        assert torch.equal(k[0, g, 0], rows[base + 2 * hd : base + 3 * hd])
        assert torch.equal(v[0, g, 0], rows[base + 3 * hd : base + 4 * hd])


@pytest.mark.parametrize("length", [9, 16])  # the rows' keys padded past an unaligned and an aligned length
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_decoder_layer_output_rows_keep_the_cache_and_those_outputs(attention, length):
    """output_rows: keys and values of every position (the cache), the layer's output at the given rows only,
    equal to the full layer's there: the last position of a prefill, or any rows under their causal mask."""
    config = InternLM2Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        bias=False,
        num_hidden_layers=1,
    )
    config._attn_implementation = attention
    torch.manual_seed(0)
    layer = InternLM2DecoderLayer(config, 0).eval()
    hidden = torch.randn(2, length, 64)
    positions = torch.arange(length)[None]
    rotary = InternLM2RotaryEmbedding(config)(hidden, positions)
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None] if attention == "eager" else None
    chosen = torch.tensor([[2, 5, 8], [0, 7, 7]])
    causal = (torch.arange(length)[None, None, :] <= chosen[:, :, None])[:, None]
    with torch.no_grad():
        full_cache, last_cache = DynamicCache(config=config), DynamicCache(config=config)
        full = layer(hidden, rotary, attention_mask=mask, past_key_values=full_cache)
        last = layer(
            hidden,
            rotary,
            attention_mask=mask,
            past_key_values=last_cache,
            output_rows=OutputRows.last_position(hidden),
        )
        some = layer(hidden, rotary, attention_mask=mask, output_rows=OutputRows(chosen, causal))
    assert last.shape == (2, 1, 64)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)
    assert torch.equal(last_cache.layers[0].keys, full_cache.layers[0].keys)
    assert torch.equal(last_cache.layers[0].values, full_cache.layers[0].values)
    assert some.shape == (2, 3, 64)
    for row in range(2):
        assert torch.allclose(some[row], full[row, chosen[row]], atol=1e-5)
    with pytest.raises(ValueError, match="attention mask"):
        OutputRows(chosen)


@pytest.mark.parametrize("length, padded", [(7, 8), (8, 16), (9, 16)])
def test_output_rows_keys_are_padded_past_the_length_to_an_aligned_one(length, padded):
    """The rows' keys, values and mask grow to a multiple of 8 that is always larger than the length (one
    expression for every length, so one compiled graph), the extra keys zero and hidden from every row."""
    k, v = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
    mask = torch.rand(2, 1, 5, length) > 0.5
    padded_k, padded_v, padded_mask = pad_keys_past_length(k, v, mask)
    assert padded == ROWS_MASK_KEY_MULTIPLE * (length // ROWS_MASK_KEY_MULTIPLE + 1)
    assert padded_k.shape == padded_v.shape == (2, 3, padded, 4) and padded_mask.shape == (2, 1, 5, padded)
    assert torch.equal(padded_k[:, :, :length], k) and torch.equal(padded_v[:, :, :length], v)
    assert torch.equal(padded_mask[..., :length], mask)
    assert not padded_mask[..., length:].any() and not padded_k[:, :, length:].any()


def rope_reference(positions, dim, base):
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def test_rope_plain_linear_and_dynamic():
    positions = torch.arange(50)[None]
    x = torch.zeros(1)
    plain = InternLM2RotaryEmbedding(InternLM2Config(hidden_size=64, num_attention_heads=4, rope_theta=1e6))
    cos, sin = plain(x, positions)
    ref_cos, ref_sin = rope_reference(positions[0], 16, 1e6)
    assert torch.allclose(cos[0], ref_cos) and torch.allclose(sin[0], ref_sin)

    linear = InternLM2RotaryEmbedding(
        InternLM2Config(
            hidden_size=64, num_attention_heads=4, rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4.0}
        )
    )
    assert torch.allclose(linear(x, positions)[0][0], rope_reference(positions[0] / 4.0, 16, 1e6)[0])

    config = InternLM2Config(
        hidden_size=64,
        num_attention_heads=4,
        rope_theta=1e6,
        max_position_embeddings=32,
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    dynamic = InternLM2RotaryEmbedding(config)
    short = torch.arange(32)[None]
    assert torch.allclose(dynamic(x, short)[0][0], rope_reference(short[0], 16, 1e6)[0])  # inert up to maxpos
    long = torch.arange(50)[None]
    base = 1e6 * (2.0 * 50 / 32 - 1.0) ** (16 / 14)
    assert torch.allclose(dynamic(x, long)[0][0], rope_reference(long[0], 16, base)[0], atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return InternVLChatModel(InternVLChatConfig(**tiny_config_dict(vocab_size=300))).eval()


def test_select_layer_takes_that_hidden_state(tiny_model):
    pixel_values = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        states = tiny_model.vision_model(pixel_values, output_hidden_states=True).hidden_states
        tiny_model.select_layer = -2
        try:
            features = tiny_model.extract_feature(pixel_values)
        finally:
            tiny_model.select_layer = -1
        x = states[-2][:, 1:].reshape(1, 32, 32, -1)
        expected = tiny_model.mlp1(pixel_shuffle(x, 0.5, "v2").reshape(1, 256, -1))
    assert torch.allclose(features, expected)


def test_position_embedding_is_resampled_bicubic_for_other_sizes(tiny_model):
    embeddings = tiny_model.vision_model.embeddings
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = embeddings(pixel_values)
        table = embeddings.position_embedding[:, 1:].reshape(1, 32, 32, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(table.float(), size=(16, 16), mode="bicubic", align_corners=False)
        resized = resized.flatten(2).transpose(1, 2)
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    assert out.shape == (1, 257, 64)
    assert torch.allclose(out[:, 1:], patches + resized, atol=1e-6)


def test_unmerged_lora_checkpoint_reloads_with_its_adapters(tmp_path):
    torch.manual_seed(0)
    model = InternVLChatModel(InternVLChatConfig(**tiny_config_dict(vocab_size=300), use_llm_lora=8)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero; a trained adapter does not
    model.save_pretrained(tmp_path)
    reloaded = InternVLChatModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    state = reloaded.state_dict()
    assert any(k.startswith("language_model.base_model.model.model.layers.0.attention.wqkv.lora_A") for k in state)
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        expected = model.language_model(input_ids=ids).logits
        got = reloaded.language_model(input_ids=ids).logits
    assert torch.equal(expected, got)
    with reloaded.language_model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(reloaded.language_model(input_ids=ids).logits, got)


@pytest.mark.parametrize("training", [False, True])
def test_vit_layer_follows_the_original_residual_formula(training):
    """x + drop_path(attn(norm1(x)) * ls1), then the same with the MLP: with stochastic depth active (training,
    the same random draws) and without it."""
    from internvl_chat.model.configuration_intern_vit import InternVisionConfig
    from internvl_chat.model.modeling_intern_vit import InternVisionEncoderLayer

    config = InternVisionConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        qkv_bias=True,
        qk_normalization=False,
        norm_type="layer_norm",
        drop_path_rate=0.5,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = InternVisionEncoderLayer(config, drop_path_rate=0.5).train(training)
    layer.ls1.data.normal_(1.0, 0.2)
    layer.ls2.data.normal_(1.0, 0.2)
    x = torch.randn(16, 5, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        out = layer(x)
        torch.manual_seed(1)
        h = x + layer.drop_path1(layer.attn(layer.norm1(x)) * layer.ls1)
        expected = h + layer.drop_path2(layer.mlp(layer.norm2(h)) * layer.ls2)
    assert torch.allclose(out, expected, atol=1e-6)
    if training:  # some samples really lost a branch
        assert not torch.allclose(out, layer.eval()(x), atol=1e-3)
