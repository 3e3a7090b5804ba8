"""The SA layers' caches in vLLM's paged memory, and attention over them in torch.

vLLM allocates every cache tensor and hands out the blocks (block tables, slot mappings). Text layers and CA
blocks are read by vLLM's own attention kernels, in the kernels' layout. An SA layer's new text token must read
the layer's visual keys *and* its text keys in one softmax, which a kernel that attends to one cache and returns
no log-sum-exp cannot compute; so an SA layer's two caches (the visual one, a cross-attention cache, and the
layer's text cache) keep this module's layout, and its attention gathers that layer's blocks alone. A layer's
tensor is (blocks, heads, block size, 2 · head_dim): a token's key in the first head_dim numbers of its row, its
value in the last.
"""

from __future__ import annotations

import torch


def write(kv_cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """File (n, heads, head_dim) keys and values at n slots (block · block size + offset)."""
    block_size, head_dim = kv_cache.shape[2], keys.shape[-1]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :head_dim] = keys.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_dim:] = values.to(kv_cache.dtype)


def gather(kv_cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first `lengths[r]` tokens: (rows, heads, blocks · block size, 2 · head_dim), whole blocks, zero
    past a row's length (a block's unused slots may hold anything, NaN included), and the (rows, blocks · block
    size) mask of the tokens that are there."""
    block_size = kv_cache.shape[2]
    count = int(-(-lengths.max() // block_size)) if len(lengths) else 0
    blocks = kv_cache[block_table[:, :count].long()]  # (rows, count, heads, block size, 2 · head_dim)
    rows, _, heads, _, width = blocks.shape
    states = blocks.permute(0, 2, 1, 3, 4).reshape(rows, heads, count * block_size, width)
    valid = torch.arange(count * block_size, device=lengths.device)[None, :] < lengths[:, None]
    return states.masked_fill_(~valid[:, None, :, None], 0), valid


def attend(query: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """One query token per row (rows, heads, head_dim) over the gathered `parts` ((states, valid) of `gather`),
    as one softmax: (rows, heads, head_dim)."""
    states = torch.cat([part for part, _ in parts], dim=2)
    valid = torch.cat([mask for _, mask in parts], dim=1)
    head_dim = query.shape[-1]
    keys, values = states[..., :head_dim], states[..., head_dim:]
    out = torch.nn.functional.scaled_dot_product_attention(
        query[:, :, None].to(keys.dtype), keys, values, attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=True)
    return out[:, :, 0]
