"""The LLM's attention for sequences grouped by image (--group_by_image): one picture's prompt and image tokens
once, then its captions, each caption seeing the prompt and itself only, under a boolean [B, 1, L, L] mask.

Up to the end of the first caption every row of that mask is plain causal, in every sequence of the batch: most of
the queries and of the attention work in COCO's shape (the prompt's ~1,850 tokens against ~15 a caption).
`prefix_split_attention` runs those head rows through SDPA's causal kernel (cuDNN on Hopper, well above flex
attention's rate there) and only the remaining tail rows under the mask: flex attention with a BlockMask on a GPU,
SDPA with the dense rows elsewhere (PyTorch has no flex attention backward on the CPU).

The attention function gets the tail rows' mask only, [B, 1, L - head, L]: the head length is the difference
of the query and mask lengths, so nothing else has to travel through transformers' decoder layers. Importing
this module registers it in transformers' attention table as PREFIX_SPLIT_ATTENTION.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PREFIX_SPLIT_ATTENTION = "prefix_split"
# The head is rounded down to whole 128-row blocks (flex attention's block size): the tail then starts on a block
# edge, and batches of one tile count share a few head lengths, so cuDNN builds few execution plans.
HEAD_MULTIPLE = 128


def causal_head_length(mask: torch.Tensor, multiple: int | None = None) -> int:
    """How many leading query rows of a boolean [B, 1, L, L] mask (True: may attend) are plain causal in every
    sequence of the batch, rounded down to a multiple of `multiple` (HEAD_MULTIPLE by default). One host wait."""
    multiple = HEAD_MULTIPLE if multiple is None else multiple
    length = mask.shape[-1]
    rows = torch.arange(length, device=mask.device)
    causal = rows[None, :] <= rows[:, None]
    differs = (mask[:, 0] != causal).any(dim=-1).any(dim=0)  # [L]: a row that is not plain causal somewhere
    first = int(torch.where(differs, rows, length).min())
    return first // multiple * multiple


def block_mask_from_dense(mask: torch.Tensor, block: int = 128):
    """A boolean [B, 1, Q, KV] mask as flex attention's BlockMask: blocks of block x block that the mask leaves
    empty are skipped, full ones run without a mask, and only the partly masked ones read the dense mask.
    The block lists come from reductions over the dense mask; create_block_mask evaluates a mask function
    through vmap instead, several times the host time, while the GPU waits for it."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, heads, q_length, kv_length = mask.shape
    q_blocks, kv_blocks = -(-q_length // block), -(-kv_length // block)
    padded = torch.nn.functional.pad(mask, (0, kv_blocks * block - kv_length, 0, q_blocks * block - q_length))
    tiles = padded.view(batch, heads, q_blocks, block, kv_blocks, block)
    allowed = tiles.any(dim=5).any(dim=3)
    full = tiles.all(dim=5).all(dim=3)  # a block cut by the sequence end is partial: its padding is False

    def block_lists(selected):  # per query block: how many kv blocks, and their indices first
        order = torch.argsort(selected.to(torch.uint8), dim=-1, descending=True, stable=True)
        return selected.sum(dim=-1, dtype=torch.int32), order.to(torch.int32)

    partial_count, partial_indices = block_lists(allowed & ~full)
    full_count, full_indices = block_lists(full)
    return BlockMask.from_kv_blocks(
        partial_count,
        partial_indices,
        full_count,
        full_indices,
        BLOCK_SIZE=block,
        mask_mod=lambda b, h, q, kv: mask[b, 0, q, kv],
        seq_lengths=(q_length, kv_length),
    )


def prefix_split_attention(module, query, key, value, attention_mask, **kwargs):
    """query [B, H, L, D], key and value [B, H_kv, L, D]; attention_mask: the tail rows' mask (the rows after
    causal_head_length, dense or as a BlockMask), or None for plain causal attention. Returns ([B, L, H, D], None),
    as transformers' attention functions do."""
    if attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    from torch.nn.attention.flex_attention import BlockMask

    tail_attention = flex_attention_forward if isinstance(attention_mask, BlockMask) else sdpa_attention_forward
    head = query.shape[2] - attention_mask.shape[-2]
    if head == 0:
        return tail_attention(module, query, key, value, attention_mask, **kwargs)
    head_out, _ = sdpa_attention_forward(
        module, query[:, :, :head], key[:, :, :head], value[:, :, :head], None, **kwargs
    )
    tail_out, _ = tail_attention(module, query[:, :, head:], key, value, attention_mask, **kwargs)
    return torch.cat([head_out, tail_out], dim=1), None


AttentionInterface.register(PREFIX_SPLIT_ATTENTION, prefix_split_attention)
# Without a 4D mask (e.g. evaluation batches) transformers builds the LLM's mask for the configured attention:
# SDPA's, which is None for plain causal attention.
AttentionMaskInterface.register(PREFIX_SPLIT_ATTENTION, sdpa_mask)
