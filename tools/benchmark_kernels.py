#!/usr/bin/env python3
"""The fused inference kernels against the PyTorch reference they replace, at InternVL2-2B's shapes on one GPU.

  python tools/benchmark_kernels.py [--batch 128] [--json kernels.json]

Rows: RMSNorm and rotary over a batched prefill ([batch x 1,850 tokens, 2,048]), SiLU x gate ([64k, 8,192]), the
ViT's layer-scaled residual and LayerNorm ([batch x 7 tiles x 1,025, 1,024]), each residual add fused with the
norm after it, the ViT's patch embedding (convolution or matmul), and for scale one decoding step's attention over
a full static KV cache ([batch, 8 kv heads, 1,880, 128], 16 query heads). For each: the median time of 20 runs,
the bytes that must move divided by that time, and the difference from the reference (the largest, and the
share of outputs not bit-identical; the decoding row is compared with fp32).
"""

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from internvl_chat.eval.fast_captioner import fast_decode_attention
from internvl_chat.model import fused_kernels


def median_ms(function, repeats: int = 20) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def reference_decode_attention(query, key, value, mask, scaling):
    return fast_decode_attention(None, query, key, value, mask, scaling)[0]


def row(name, function, moved_bytes, reference=None):
    milliseconds = median_ms(function)
    result = {"kernel": name, "ms": round(milliseconds, 3), "GB_per_s": round(moved_bytes / milliseconds / 1e6)}
    if reference is not None:
        out = function()
        result["max_abs_diff"] = float((out.float() - reference.float()).abs().max())
        result["share_differing"] = round(float((out != reference.to(out.dtype)).float().mean()), 5)
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="images in the batch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    with torch.inference_mode():
        tokens, width = args.batch * 1850, 2048
        x = torch.randn(tokens, width, device=device, dtype=dtype)
        norm = fused_kernels.RMSNorm(width, eps=1e-5).to(device, dtype)
        norm.weight.normal_(1.0, 0.1)
        eager_norm = partial(fused_kernels.rms_norm_reference, weight=norm.weight, eps=1e-5)
        reference = eager_norm(x)
        moved = 2 * x.numel() * x.element_size()
        rows.append(row("rms_norm: reference (eager)", lambda: eager_norm(x), moved))
        rows.append(row("rms_norm: triton", lambda: norm(x), moved, reference))
        rows.append(
            row(
                "rms_norm: F.rms_norm (for comparison)",
                lambda: F.rms_norm(x, (width,), norm.weight, 1e-5),
                moved,
                reference,
            )
        )
        x = reference = None  # free the memory before the next rows

        gate = torch.randn(65536, 8192, device=device, dtype=dtype)
        up = torch.randn_like(gate)
        reference = F.silu(gate) * up
        moved = 3 * gate.numel() * gate.element_size()
        rows.append(row("silu_mul: reference (eager)", lambda: F.silu(gate) * up, moved))
        rows.append(row("silu_mul: triton", lambda: fused_kernels.silu_mul(gate, up), moved, reference))
        gate = up = reference = None

        # q as the fused wqkv hands it over: a strided view of [tokens, 8 kv heads, 2 q + k + v, 128]
        length = 1850
        qkv = torch.randn(args.batch // 4, length, 8, 4, 128, device=device, dtype=dtype)  # a quarter batch: memory
        q = qkv[..., :2, :].reshape(args.batch // 4, length, 16, 128).transpose(1, 2)
        angles = torch.randn(1, length, 128, device=device)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        reference = fused_kernels.rotary_reference(q, cos, sin)
        moved = 2 * q.numel() * q.element_size()
        rows.append(
            row(
                "rotary (q, quarter batch): reference (eager)",
                lambda: fused_kernels.rotary_reference(q, cos, sin),
                moved,
            )
        )
        rows.append(
            row("rotary (q, quarter batch): triton", lambda: fused_kernels.apply_rotary(q, cos, sin), moved, reference)
        )
        qkv = q = reference = None

        residual = torch.randn(args.batch * 7 * 1025, 1024, device=device, dtype=dtype)
        branch, scale = torch.randn_like(residual), torch.rand(1024, device=device, dtype=dtype)
        reference = residual + branch * scale
        moved = 3 * residual.numel() * residual.element_size()
        rows.append(row("layer-scaled residual (ViT): reference (eager)", lambda: residual + branch * scale, moved))
        rows.append(
            row(
                "layer-scaled residual (ViT): triton",
                lambda: fused_kernels.add_scaled(residual, branch, scale),
                moved,
                reference,
            )
        )
        layer_norm = fused_kernels.LayerNorm(1024, eps=1e-6).to(device, dtype)
        layer_norm.weight.normal_(1.0, 0.1)
        layer_norm.bias.normal_(0.0, 0.1)
        eager_norm = torch.nn.LayerNorm(1024, eps=1e-6).to(device, dtype)
        eager_norm.load_state_dict(layer_norm.state_dict())
        reference = eager_norm(residual)
        moved = 2 * residual.numel() * residual.element_size()
        rows.append(row("LayerNorm (ViT): reference (eager)", lambda: eager_norm(residual), moved))
        rows.append(row("LayerNorm (ViT): triton", lambda: layer_norm(residual), moved, reference))
        reference = eager_norm(residual + branch * scale)
        moved = 4 * residual.numel() * residual.element_size()
        rows.append(
            row(
                "layer-scaled residual + LayerNorm (ViT): reference (eager)",
                lambda: eager_norm(residual + branch * scale),
                moved,
            )
        )
        rows.append(
            row(
                "layer-scaled residual + LayerNorm (ViT): triton, one pass",
                lambda: fused_kernels.add_then_norm(residual, branch, scale, layer_norm)[1],
                moved,
                reference,
            )
        )
        residual = branch = reference = None

        x = torch.randn(args.batch * 1850, 2048, device=device, dtype=dtype)
        branch = torch.randn_like(x)
        norm.to(device, dtype)
        reference = eager_norm(x + branch)
        moved = 4 * x.numel() * x.element_size()
        rows.append(row("residual add + RMSNorm (LLM): reference (eager)", lambda: eager_norm(x + branch), moved))
        rows.append(
            row(
                "residual add + RMSNorm (LLM): triton, one pass",
                lambda: fused_kernels.add_then_norm(x, branch, None, norm)[1],
                moved,
                reference,
            )
        )
        x = branch = reference = None

        # the ViT's patch embedding over a batch of tiles: cuDNN's convolution against the matmul the model runs
        from internvl_chat.model.configuration_intern_vit import InternVisionConfig
        from internvl_chat.model.modeling_intern_vit import InternVisionEmbeddings

        embeddings = InternVisionEmbeddings(InternVisionConfig(hidden_size=1024, image_size=448, patch_size=14))
        embeddings.to(device, dtype)
        pixels = torch.randn(args.batch * 7, 3, 448, 448, device=device, dtype=dtype)
        conv = embeddings.patch_embedding
        reference = conv(pixels).flatten(2).transpose(1, 2)
        moved = pixels.numel() * pixels.element_size() + reference.numel() * reference.element_size()
        rows.append(row("patch embedding: nn.Conv2d (cuDNN)", lambda: conv(pixels), moved))
        rows.append(row("patch embedding: as one matmul", lambda: embeddings._embed_patches(pixels), moved, reference))
        pixels = reference = None

        batch, heads, kv_heads, head_dim, capacity = args.batch, 16, 8, 128, 1880
        filled = capacity - 10
        query = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        key = torch.randn(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        value = torch.randn_like(key)
        length = torch.tensor([filled], device=device)
        mask = torch.zeros(capacity, device=device).masked_fill(
            torch.arange(capacity, device=device) >= filled, float("-inf")
        )[None, None, None]
        scaling = head_dim**-0.5
        exact = reference_decode_attention(query.float(), key.float(), value.float(), mask, scaling)
        moved = 2 * key.numel() * key.element_size()
        rows.append(
            row(
                "decode attention (fast engine: 2 batched matmuls over the cache)",
                lambda: reference_decode_attention(query, key, value, mask, scaling),
                moved,
                exact,
            )
        )
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}")
    print("| kernel | ms | GB/s | max abs diff | share of outputs differing |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kernel']} | {r['ms']} | {r['GB_per_s']:,} | {r.get('max_abs_diff', '')} | "
            f"{r.get('share_differing', '')} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
