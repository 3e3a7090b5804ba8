"""VISOR's caches in vLLM's paged memory: what a prompt's prefill leaves (`visor.modeling.cache.VisorCache`) is
filed into vLLM's blocks, and each decoding step reads a request's blocks back into a `VisorCache` for the
VISOR model's own decoding loop.

vLLM allocates every cache tensor and hands out the blocks (block tables, slot mappings); the layout *inside*
a block is this module's, because VISOR's attention runs in torch, not in vLLM's kernels (see
`visor.integrations.vllm.model`). A layer's tensor is (blocks, heads, block size, 2 · head_dim): a token's key
in the first head_dim numbers of its row, its value in the last. Nothing else reads these tensors.
"""

from __future__ import annotations

import torch


def write(kv_cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """File (n, heads, head_dim) keys and values at n slots (block · block size + offset)."""
    block_size, head_dim = kv_cache.shape[2], keys.shape[-1]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, :, offsets, :head_dim] = keys.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_dim:] = values.to(kv_cache.dtype)


def read(kv_cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, longest: int | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `lengths[r]` tokens of each row's blocks: keys and values (rows, heads, longest, head_dim),
    zero past a row's length, and the (rows, longest) mask of the tokens that are there (`longest`: default the
    longest row)."""
    block_size = kv_cache.shape[2]
    if longest is None:
        longest = int(lengths.max()) if len(lengths) else 0
    order = torch.arange(longest, device=block_table.device)
    valid = order[None, :] < lengths[:, None].to(order.device)
    blocks = block_table.gather(1, (order // block_size)[None, :].expand(len(lengths), -1).clamp(
        max=block_table.shape[1] - 1)).long()
    rows = kv_cache[blocks, :, (order % block_size)[None, :].expand_as(blocks)]  # (rows, longest, heads, 2·hd)
    rows = rows.masked_fill(~valid[..., None, None], 0)  # blocks past a row's end may hold anything
    head_dim = kv_cache.shape[-1] // 2
    keys, values = rows[..., :head_dim], rows[..., head_dim:]
    return keys.transpose(1, 2), values.transpose(1, 2), valid
