"""What one VISOR request takes from vLLM's KV-cache pool, read from the engine's own KV-cache configuration.

vLLM groups layers with the same cache spec (text caches: `FullAttentionSpec`, visual caches:
`CrossAttentionSpec`), gives each group a block table, and draws every group's blocks from one pool. A request
holds, in every group, enough blocks for its tokens of that kind: text tokens (prompt and generated) in the text
groups, visual tokens in the cross-attention groups. A block of the pool costs the same bytes whichever group holds
it (vLLM pads groups to equal layer counts), so the pool's size in blocks decides how many requests fit. The
groups' tensors overlay one allocation (vLLM 0.32's layout), so the pool is as large as the furthest tensor's end.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.kv_cache_interface import CrossAttentionSpec, KVCacheConfig


def kv_cache_config(llm) -> KVCacheConfig:
    """The KV-cache configuration of an in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)."""
    engine = llm.llm_engine.engine_core
    if not hasattr(engine, "engine_core"):
        raise ValueError("the engine runs in another process: set VLLM_ENABLE_V1_MULTIPROCESSING=0 to read its "
                         "KV-cache configuration")
    return engine.engine_core.scheduler.kv_cache_config


@dataclass(frozen=True)
class RequestFootprint:
    blocks: int  # pool blocks the request holds, all groups together
    reserved_bytes: int  # what those blocks take from the pool
    visual_bytes: int  # of which the visual caches' layers fill (tokens rounded up to whole blocks)
    text_bytes: int  # and the text caches' layers


def footprint(config: KVCacheConfig, text_tokens: int, visual_tokens: int) -> RequestFootprint:
    """The pool blocks and bytes a request with these token counts holds."""
    pool_bytes = max(tensor.offset + tensor.size for tensor in config.kv_cache_tensors)
    blocks = visual = text = 0
    for group in config.kv_cache_groups:
        spec = group.kv_cache_spec
        is_visual = isinstance(spec, CrossAttentionSpec)
        count = -(-(visual_tokens if is_visual else text_tokens) // spec.block_size)
        blocks += count
        filled = count * spec.page_size_bytes * len(group.layer_names)
        visual, text = (visual + filled, text) if is_visual else (visual, text + filled)
    return RequestFootprint(blocks=blocks, reserved_bytes=blocks * pool_bytes // config.num_blocks,
                            visual_bytes=visual, text_bytes=text)


def requests_that_fit(config: KVCacheConfig, text_tokens: int, visual_tokens: int) -> int:
    """Requests of this size whose caches the pool holds at once (vLLM keeps one block back as its null block)."""
    return (config.num_blocks - 1) // footprint(config, text_tokens, visual_tokens).blocks
