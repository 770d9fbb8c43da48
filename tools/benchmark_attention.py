#!/usr/bin/env python3
"""Attention kernels at InternVL2-2B's shapes on one GPU: which SDPA backend, layout and masking is fastest.

  python tools/benchmark_attention.py [--json attention.json]

Cases (bf16, 16 query heads):
  - training, per caption: 4 sequences of 1,850 tokens, 8 KV heads, head dim 128, causal; forward + backward;
  - training, shared image: 4 sequences of one 1,850-token prefix and 5 captions of 16 tokens that each see the
    prefix and themselves; as one dense boolean mask, as a causal prefix pass plus a small masked pass for the
    caption queries, and (if it compiles) flex attention with a block mask;
  - evaluation prefill: 32 prompts of 1,852 tokens, causal, forward only (a quarter of a 128-image batch);
  - ViT: 224 tiles of 1,025 tokens, 16 heads of 64, no mask, forward only (a quarter batch).
Each backend is forced with torch.nn.attention.sdpa_kernel; a backend that cannot run a case is reported as such.
Prints the median time of 10 runs and the attention FLOP rate (masked-out blocks not counted).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmark_kernels import median_ms  # tools/ is on the path when run as a script

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention_flops(batch, heads, query_length, key_length, head_dim, causal):
    pairs = query_length * key_length / (2 if causal else 1)
    return 4 * batch * heads * pairs * head_dim


def qkv(batch, heads, kv_heads, length, head_dim, grad):
    make = lambda h: torch.randn(batch, h, length, head_dim, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                 requires_grad=grad)
    return make(heads), make(kv_heads), make(kv_heads)


def timed_row(rows, case, variant, function, flops, backward):
    grad_out = None

    def run():
        nonlocal grad_out
        out = function()
        if backward:
            if grad_out is None:
                grad_out = torch.randn_like(out)
            out.backward(grad_out)

    try:
        milliseconds = median_ms(run, repeats=10)
    except Exception as error:  # backend refuses the case
        row = {"case": case, "variant": variant, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    else:
        total = flops * (3.5 if backward else 1.0)  # backward ~2.5x the forward's matmul work
        row = {"case": case, "variant": variant, "ms": round(milliseconds, 3),
               "tflops": round(total / milliseconds / 1e9, 1)}
    print(row, flush=True)
    rows.append(row)


def sdpa_rows(rows, case, q, k, v, flops, backward, causal=False, mask=None, variants=BACKENDS):
    groups = q.shape[1] // k.shape[1]
    for name, backend in variants.items():
        for layout in ("gqa", "expanded") if groups > 1 else ("plain",):
            def call(backend=backend, layout=layout):
                with sdpa_kernel(backend):
                    if layout == "gqa":
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                              enable_gqa=True)
                    key = k.repeat_interleave(groups, dim=1) if groups > 1 else k
                    value = v.repeat_interleave(groups, dim=1) if groups > 1 else v
                    return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, is_causal=causal)
            timed_row(rows, case, f"{name}, {layout}", call, flops, backward)


def shared_image_case(rows, batch=4, prefix=1850, captions=5, caption_length=16):
    heads, kv_heads, head_dim = 16, 8, 128
    segments = captions * caption_length
    length = prefix + segments
    q, k, v = qkv(batch, heads, kv_heads, length, head_dim, grad=True)
    dense = torch.zeros(length, length, dtype=torch.bool, device="cuda")
    dense[:prefix, :prefix] = torch.ones(prefix, prefix, dtype=torch.bool, device="cuda").tril()
    for c in range(captions):
        start = prefix + c * caption_length
        dense[start:start + caption_length, :prefix] = True
        dense[start:start + caption_length, start:start + caption_length] = torch.ones(
            caption_length, caption_length, dtype=torch.bool, device="cuda").tril()
    dense = dense[None, None].expand(batch, 1, length, length)
    flops = attention_flops(batch, heads, prefix, prefix, head_dim, True) + \
        attention_flops(batch, heads, segments, prefix + caption_length / 2, head_dim, False)
    case = "train shared image [4 x (1,850 + 5 x 16)], fwd+bwd"
    sdpa_rows(rows, case + ", dense mask", q, k, v, flops, True, mask=dense,
              variants={"efficient": BACKENDS["efficient"], "cudnn": BACKENDS["cudnn"]})

    segment_mask = dense[:, :, prefix:]

    def split(backend):
        with sdpa_kernel(backend):
            head = F.scaled_dot_product_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix],
                                                  is_causal=True, enable_gqa=True)
        with sdpa_kernel(BACKENDS["efficient"]):
            groups = heads // kv_heads
            tail = F.scaled_dot_product_attention(q[:, :, prefix:], k.repeat_interleave(groups, 1),
                                                  v.repeat_interleave(groups, 1), attn_mask=segment_mask)
        return torch.cat([head, tail], dim=2)

    for name in ("cudnn", "flash"):
        timed_row(rows, case, f"split: causal prefix ({name}) + masked captions (efficient)",
                  lambda name=name: split(BACKENDS[name]), flops, True)

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        segment_of = torch.zeros(length, dtype=torch.long, device="cuda")
        for c in range(captions):
            segment_of[prefix + c * caption_length: prefix + (c + 1) * caption_length] = c + 1

        def allowed(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((segment_of[kv_idx] == 0) | (segment_of[kv_idx] == segment_of[q_idx]))

        block_mask = create_block_mask(allowed, None, None, length, length, device="cuda")
        compiled = torch.compile(flex_attention)
        timed_row(rows, case, "flex attention, block mask",
                  lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True), flops, True)
    except Exception as error:
        print(f"flex attention: {type(error).__name__}: {error}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []

    q, k, v = qkv(4, 16, 8, 1850, 128, grad=True)
    sdpa_rows(rows, "train per caption [4 x 1,850], causal, fwd+bwd", q, k, v,
              attention_flops(4, 16, 1850, 1850, 128, True), True, causal=True)
    del q, k, v
    shared_image_case(rows)
    with torch.inference_mode():
        q, k, v = qkv(32, 16, 8, 1852, 128, grad=False)
        sdpa_rows(rows, "eval prefill [32 x 1,852], causal, fwd", q, k, v,
                  attention_flops(32, 16, 1852, 1852, 128, True), False, causal=True)
        del q, k, v
        q, k, v = qkv(224, 16, 16, 1025, 64, grad=False)
        sdpa_rows(rows, "ViT [224 tiles x 1,025], head dim 64, fwd", q, k, v,
                  attention_flops(224, 16, 1025, 1025, 64, False), False)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| case | variant | ms | TFLOP/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['variant']} | {r.get('ms', r.get('error'))} | {r.get('tflops', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
