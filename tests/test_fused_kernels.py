"""The Triton inference kernels (RMSNorm, LayerNorm, residual add + norm, rotary, SiLU x gate, layer-scaled
residual) against the PyTorch reference, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, in a fresh
process: the switch is read when the kernels are defined). fp16, because the interpreter computes through numpy,
which has no bf16; the kernels take their rounding steps from the tensor dtype, so bf16 runs the same code
(tools/benchmark_kernels.py checks bf16 on a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

KERNELS = r"""
import json, torch
import torch.nn.functional as F
from internvl_chat.model import fused_kernels as fk
torch.manual_seed(0)
h = torch.float16
out = {}
def compare(fused, reference):
    return [float((fused.float() - reference.float()).abs().max()), float((fused != reference).float().mean())]

with torch.no_grad():
    x = torch.randn(3, 5, 96).to(h)
    norm = fk.RMSNorm(96, eps=1e-5).to(h)
    norm.weight.normal_(1.0, 0.2)
    reference = fk.rms_norm_reference(x, norm.weight, 1e-5)
    fused = norm(x)
    out["rms_norm"] = compare(fused, reference)

    # q and k as the fused wqkv hands them over: strided views of one [B, L, kv, G + 2, D] tensor
    qkv = torch.randn(2, 7, 2, 4, 16).to(h)
    q = qkv[..., :2, :].reshape(2, 7, 4, 16).transpose(1, 2)
    k = qkv[..., 2, :].transpose(1, 2)
    angles = torch.randn(1, 7, 16)
    cos, sin = angles.cos().to(h), angles.sin().to(h)
    for name, t in (("rotary_q", q), ("rotary_k", k)):
        reference = fk.rotary_reference(t, cos, sin)
        fused = fk.apply_rotary(t, cos, sin)
        out[name] = compare(fused, reference) + [list(fused.shape) == list(reference.shape)]
    cos_b, sin_b = torch.randn(2, 7, 16).to(h), torch.randn(2, 7, 16).to(h)  # per-sample tables
    fused = fk.rotary(q, cos_b, sin_b)
    reference = q * cos_b[:, None] + torch.cat((-q[..., 8:], q[..., :8]), -1) * sin_b[:, None]
    out["rotary_per_sample"] = compare(fused, reference) + [True]

    gate, up = torch.randn(5, 300).to(h), torch.randn(5, 300).to(h)
    fused, reference = fk.silu_times(gate, up), F.silu(gate) * up
    out["silu_mul"] = compare(fused, reference)

    residual, branch, scale = torch.randn(2, 9, 64).to(h), torch.randn(2, 9, 64).to(h), torch.rand(64).to(h)
    fused, reference = fk.add_scaled(residual, branch, scale), residual + branch * scale
    out["scaled_residual"] = compare(fused, reference)

    # LayerNorm of width 80 (not a power of two: masked columns must not enter the mean or the variance)
    x = (torch.randn(4, 6, 80) * 3 + 1).to(h)
    layer_norm = fk.LayerNorm(80, eps=1e-6).to(h)
    layer_norm.weight.normal_(1.0, 0.2)
    layer_norm.bias.normal_(0.0, 0.2)
    fused, reference = layer_norm(x), F.layer_norm(x.float(), (80,), layer_norm.weight.float(),
                                                    layer_norm.bias.float(), 1e-6).to(h)
    out["layer_norm"] = compare(fused, reference)
    # residual add + the following norm: the sum exactly as the eager add, the norm as the module's reference
    branch = torch.randn(4, 6, 80).to(h)
    for name, norm, scale in (("add_layer_norm", layer_norm, torch.rand(80).to(h)),
                              ("add_rms_norm", fk.RMSNorm(80, eps=1e-5).to(h), None)):
        total, normed = fk.add_then_norm(x, branch, scale, norm)
        expected = x + branch * scale if scale is not None else x + branch
        with torch.enable_grad():  # a norm whose input needs a gradient runs the reference ops
            reference = norm(expected.requires_grad_()).detach()
        out[name + "_sum"] = compare(total, expected)
        out[name] = compare(normed, reference)
print(json.dumps(out))
"""


def run_interpreted(script: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_kernels_round_like_the_reference():
    results = run_interpreted(KERNELS)
    for name in (
        "rotary_q",
        "rotary_k",
        "rotary_per_sample",
        "scaled_residual",
        "add_layer_norm_sum",
        "add_rms_norm_sum",
    ):  # products and sums only
        max_diff, share_differing, *same_shape = results[name]
        assert share_differing == 0.0 and max_diff == 0.0, (name, results[name])
        assert all(same_shape), name
    # RMSNorm sums squares in another order than torch.mean and SiLU's exp is numpy's here, not torch's: at most
    # one fp16 step on a few outputs (on a GPU in bf16 both are bit-identical: tools/benchmark_kernels.py)
    for name in ("rms_norm", "silu_mul", "layer_norm", "add_layer_norm", "add_rms_norm"):
        max_diff, share_differing = results[name]
        assert share_differing < 0.01 and max_diff <= 2e-3, (name, results[name])


MODEL = r"""
import json, sys, torch
from internvl_chat.model import fused_kernels as fk
from internvl_chat.checkpoint.loader import load_model
model = load_model(sys.argv[1], dtype=torch.float16, device="cpu").eval()
torch.manual_seed(0)
pixel_values = torch.randn(2, 3, model.config.force_image_size, model.config.force_image_size)
ids = torch.randint(3, 200, (2, 40))
ids[:, 5:5 + model.num_image_token] = model.img_context_token_id = 90
calls = {}
def counted(name, kernel):
    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return kernel(*args, **kwargs)
    return wrapper
for name in ("rotary", "silu_mul", "scaled_residual", "residual_norm"):
    setattr(fk, name, counted(name, getattr(fk, name)))
# with gradients (the parameters need them) every op takes the reference path; without, the kernels
reference = model(pixel_values=pixel_values, input_ids=ids, image_flags=torch.ones(2, 1)).logits.detach()
assert not calls, calls
with torch.no_grad():
    fused = model(pixel_values=pixel_values, input_ids=ids, image_flags=torch.ones(2, 1)).logits
print(json.dumps([float((fused - reference).abs().max()), float(reference.abs().max()), calls]))
"""


def test_model_forward_with_kernels_matches_reference(tmp_path):
    from internvl_chat.devkit.checkpoint import build_checkpoint

    build_checkpoint(tmp_path / "tiny", seed=0, image_size=224)
    max_diff, scale, calls = run_interpreted(MODEL.replace("sys.argv[1]", repr(str(tmp_path / "tiny"))))
    layers = 2  # the tiny model's LLM and ViT depth
    # residual_norm, every norm: per layer the ViT's norm1 (LayerNorm alone) and norm2 (after its residual add),
    # the LLM's attention_norm (alone) and ffn_norm (after its residual add), plus the LLM's final norm;
    # scaled_residual: the ViT's second residual
    assert calls == {
        "rotary": 2 * layers,
        "silu_mul": layers,
        "scaled_residual": layers,
        "residual_norm": 4 * layers + 1,
    }, calls
    assert scale > 0.1
    assert max_diff <= 1e-2 * scale, (max_diff, scale)  # fp16 logits; a wiring error gives O(scale)


def test_6b_vit_forward_with_kernels_matches_reference(tmp_path):
    """The InternViT-6B layout (RMSNorm, QK-norm, no qkv bias): its norm2 goes through the residual + norm kernel
    with the layer scale, its norm1 and QK-norms through the same kernel without a residual."""
    from internvl_chat.devkit.checkpoint import build_checkpoint

    build_checkpoint(tmp_path / "tiny6b", vit="6b", seed=0, image_size=224)
    max_diff, scale, calls = run_interpreted(MODEL.replace("sys.argv[1]", repr(str(tmp_path / "tiny6b"))))
    layers = 2
    # residual_norm: per layer the ViT's norm1, q_norm, k_norm and norm2 and the LLM's attention_norm and ffn_norm,
    # plus the LLM's final norm
    assert calls == {
        "rotary": 2 * layers,
        "silu_mul": layers,
        "scaled_residual": layers,
        "residual_norm": 6 * layers + 1,
    }, calls
    assert scale > 0.1
    assert max_diff <= 1e-2 * scale, (max_diff, scale)
