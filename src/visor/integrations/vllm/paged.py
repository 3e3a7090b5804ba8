"""An SA layer's one softmax over its visual and its text keys, in vLLM's own CPU attention kernel.

vLLM keeps an SA layer's visual keys in a cross-attention cache and its text keys in the layer's decoder cache: two
caches, while the stock layer attends to both at once. The kernel attends to one cache per call and returns no
log-sum-exp, so two calls cannot be merged. But vLLM 0.32 lays every layer's cache out in one allocation, cache
groups overlaid, with the same page (block) size, and a block id from any group addresses the same kind of page:
so one view of the allocation covers both caches, and a request's *joint* block table, its visual blocks then its
text blocks, holds the layer's tokens as one sequence. VISOR stores an SA layer's tokens there in the original
order (text before the image, the image, the text after it, then each generated token), and one causal kernel
call computes the layer's attention, prefill and decoding alike. A request that runs the layer as a text layer
(the router chose so) uses its text blocks alone. Nothing reads these two caches but this module.

`JointCache.check` refuses a layout where that does not hold (another vLLM version may lay caches out
differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops


@dataclass
class JointCache:
    keys: torch.Tensor  # (pages, heads, block size, head_dim) views over both caches' pages
    values: torch.Tensor
    visual_shift: int  # a visual block id plus this is its page in the joint view
    text_shift: int
    block_size: int

    @classmethod
    def of(cls, visual_cache: torch.Tensor, text_cache: torch.Tensor) -> JointCache:
        """The joint view of one layer's visual and text caches ((blocks, heads, block size, 2 · head_dim) each)."""
        cls.check(visual_cache, text_cache)
        blocks, heads, block_size, width = visual_cache.shape
        page = visual_cache.stride(0)
        base = min(visual_cache.storage_offset(), text_cache.storage_offset())
        visual_shift = (visual_cache.storage_offset() - base) // page
        text_shift = (text_cache.storage_offset() - base) // page
        joint = torch.as_strided(visual_cache, (max(visual_shift, text_shift) + blocks, heads, 2 * block_size,
                                                width // 2), (page, 2 * block_size * (width // 2), width // 2, 1),
                                 base)
        keys, values = joint.chunk(2, dim=2)
        return cls(keys, values, visual_shift, text_shift, block_size)

    @staticmethod
    def check(visual_cache: torch.Tensor, text_cache: torch.Tensor) -> None:
        same = (visual_cache.untyped_storage().data_ptr() == text_cache.untyped_storage().data_ptr()
                and visual_cache.shape == text_cache.shape and visual_cache.stride() == text_cache.stride()
                and visual_cache.is_contiguous() and text_cache.is_contiguous()
                and (visual_cache.storage_offset() - text_cache.storage_offset()) % visual_cache.stride(0) == 0)
        if not same:
            raise RuntimeError("an SA layer's visual and text caches do not share one allocation with equal pages; "
                               "this vLLM lays out KV caches differently from 0.32, which VISOR's SA layers need")

    def block_table(self, visual_table: torch.Tensor, visual_tokens: torch.Tensor, text_table: torch.Tensor,
                    text_tokens: torch.Tensor, joint: torch.Tensor) -> torch.Tensor:
        """(rows, blocks) int32: where each row's sequence lies, its visual blocks then its text blocks for rows
        where `joint` holds (their visual tokens first), its text blocks alone otherwise."""
        visual_blocks = torch.where(joint, -(-visual_tokens // self.block_size), 0)
        text_blocks = -(-text_tokens // self.block_size)
        width = max(int((visual_blocks + text_blocks).max()) if len(joint) else 0, 1)
        order = torch.arange(width, device=text_table.device)[None, :]
        visual = _fit(visual_table, width) + self.visual_shift
        text = _fit(text_table, width).gather(1, (order - visual_blocks[:, None]).clamp(min=0)) + self.text_shift
        return torch.where(order < visual_blocks[:, None], visual, text).int()

    def write(self, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, rows: torch.Tensor,
              positions: torch.Tensor, isa: str) -> None:
        """File (n, heads, head_dim) keys and values at positions `positions` of the sequences of table rows
        `rows`, in the kernel's layout."""
        table = table.long()
        slots = table[rows, positions // self.block_size] * self.block_size + positions % self.block_size
        ops.cpu_attn_reshape_and_cache(keys, values, self.keys, self.values, slots, isa)

    def attend(self, query: torch.Tensor, query_start: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor,
               scale: float, isa: str) -> torch.Tensor:
        """Causal attention of each row's queries (the last of its `lengths` tokens), rows one after another in
        `query` (n, heads, head_dim) as `query_start` (rows + 1) says: (n, heads, head_dim)."""
        query_start, lengths = query_start.int(), lengths.int()
        plan = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(lengths), num_heads=query.shape[1], num_kv_heads=self.keys.shape[1],
            head_dim=query.shape[2], seq_lens=lengths, dtype=query.dtype, query_start_loc=query_start, causal=True,
            sliding_window_size=-1, isa=isa, enable_kv_split=True)
        out = torch.empty_like(query)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=self.keys, value_cache=self.values, output=out, query_start_loc=query_start,
            seq_lens=lengths, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
            softcap=0.0, scheduler_metadata=plan, s_aux=None)
        return out


def _fit(table: torch.Tensor, width: int) -> torch.Tensor:
    """A block table cut or padded to `width` columns (slots past a row's blocks are never read)."""
    table = table[:, :width].long().clamp(min=0)
    return torch.nn.functional.pad(table, (0, width - table.shape[1]))
