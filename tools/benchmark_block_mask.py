#!/usr/bin/env python3
"""Host time to build flex attention's BlockMask from a shared-image mask: create_block_mask (a mask function
evaluated through vmap) against block_mask_from_dense (reductions over the dense mask), same block lists.

  python tools/benchmark_block_mask.py [--device cuda]

The masks are COCO-shaped shared-image masks (4 pictures, a 1,830-token prompt, 4 captions of ~15 tokens):
whole, and the rows the prefix split leaves to flex attention; plus a small one, where the host's per-operation
cost is all there is. Prints the median of 20 builds (after 3 unrecorded ones), synchronized on a GPU.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from internvl_chat.data.collator import shared_image_mask  # noqa: E402
from internvl_chat.model.shared_image_attention import block_mask_from_dense, causal_head_length  # noqa: E402


def coco_mask(pictures: int, prompt: int, captions: list[int], length: int, device) -> torch.Tensor:
    ends = [prompt + sum(captions[: i + 1]) for i in range(len(captions))]
    spans = list(zip([prompt] + ends[:-1], ends))
    return shared_image_mask(length, prompt, spans).expand(pictures, 1, length, length).contiguous().to(device)


def median_ms(build, mask, device) -> float:
    times = []
    for attempt in range(23):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        build(mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if attempt >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    device = torch.device(parser.parse_args().device)
    from torch.nn.attention.flex_attention import create_block_mask

    def with_vmap(mask):
        batch, _, q_length, kv_length = mask.shape
        return create_block_mask(lambda b, h, q, kv: mask[b, 0, q, kv], batch, None, q_length, kv_length,
                                 device=mask.device)

    coco = coco_mask(4, 1830, [14, 15, 13, 15], 1904, device)
    cases = {"[4, 1, 256, 256], causal": torch.ones(4, 1, 256, 256, dtype=torch.bool, device=device).tril(),
             "COCO shared image, whole [4, 1, 1904, 1904]": coco,
             "COCO shared image, the prefix split's tail rows": coco[:, :, causal_head_length(coco):]}
    print(f"{device.type}, torch {torch.__version__}")
    print("| mask | create_block_mask ms | block_mask_from_dense ms |")
    print("|---|---|---|")
    for name, mask in cases.items():
        print(f"| {name} | {median_ms(with_vmap, mask, device):.2f} | "
              f"{median_ms(block_mask_from_dense, mask, device):.2f} |")


if __name__ == "__main__":
    main()
