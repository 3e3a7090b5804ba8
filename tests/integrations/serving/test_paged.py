"""An SA layer's joint sequence in vLLM's paged memory (`visor.integrations.vllm.paged`): tokens filed in the
original order across a request's visual blocks and text blocks, read by vLLM's own CPU kernel in one call, equal
plain causal attention over the same tokens, for a prefill whose text comes before and after the image, for
decoding, and for a request that reads its text blocks alone. The caches overlay one allocation as vLLM 0.32
lays them out."""

from __future__ import annotations

import os

import pytest
import torch

if not os.environ.get("VISOR_REQUIRE_VLLM"):
    pytest.importorskip("vllm")

from visor.integrations.vllm.paged import JointCache  # noqa: E402

HEADS, QUERY_HEADS, BLOCK, HEAD_DIM, BLOCKS = 2, 4, 32, 32, 8


def _caches(dtype):
    """Two layers' caches over one allocation, as vLLM 0.32 makes them (a text group's and a visual group's)."""
    page = HEADS * BLOCK * 2 * HEAD_DIM
    memory = torch.zeros(2 * BLOCKS * page, dtype=dtype)
    view = lambda layer: memory[layer * BLOCKS * page:(layer + 1) * BLOCKS * page].view(BLOCKS, HEADS, BLOCK,
                                                                                           2 * HEAD_DIM)
    return view(1), view(0)


def _reference(query, keys, values, scale):
    keys, values = keys.float().repeat_interleave(2, 1), values.float().repeat_interleave(2, 1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * scale
    length = len(keys)
    scores = scores.masked_fill(torch.arange(length)[None] > torch.arange(length - len(query), length)[:, None],
                                float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@pytest.mark.parametrize("dtype,isa,tolerance", [(torch.float32, "vec", 1e-5), (torch.bfloat16, "amx", 2e-2)])
def test_one_kernel_call_attends_to_visual_and_text_keys_as_one_softmax(dtype, isa, tolerance):
    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX on this CPU")
    torch.manual_seed(0)
    (torch.randn(32, 32, dtype=dtype) @ torch.randn(32, 32, dtype=dtype)).sum()  # AMX tiles: enabled by a matmul
    visual_cache, text_cache = _caches(dtype)
    cache = JointCache.of(visual_cache, text_cache)
    # Request 0: 5 text tokens, a 40-token image, 7 text tokens; request 1: text only (reads its text blocks).
    visual_table, text_table = torch.tensor([[6, 2], [0, 0]]), torch.tensor([[3, 7], [5, 1]])
    visual, joint = torch.tensor([40, 0]), torch.tensor([True, False])
    text_tokens = torch.tensor([12, 20])
    table = cache.block_table(visual_table, visual, text_table, text_tokens, joint)
    lengths = text_tokens + visual * joint
    scale = HEAD_DIM ** -0.5
    stored = [[], []]
    for step in range(4):  # the prompts, then three decoding steps
        counts = lengths.tolist() if step == 0 else [1, 1]
        query = torch.randn(sum(counts), QUERY_HEADS, HEAD_DIM, dtype=dtype)
        keys, values = (torch.randn(sum(counts), HEADS, HEAD_DIM, dtype=dtype) for _ in range(2))
        rows = torch.repeat_interleave(torch.arange(2), torch.tensor(counts))
        positions = torch.cat([torch.arange(length - count, length) for length, count in zip(lengths.tolist(),
                                                                                              counts)])
        cache.write(keys, values, table, rows, positions, isa)
        start = torch.tensor([0, *counts]).cumsum(0)
        out = cache.attend(query, start, lengths, table, scale, isa)
        for request in range(2):
            part = slice(int(start[request]), int(start[request + 1]))
            stored[request].append((keys[part], values[part]))
            expected = _reference(query[part], torch.cat([k for k, _ in stored[request]]),
                                  torch.cat([v for _, v in stored[request]]), scale)
            torch.testing.assert_close(out[part].float(), expected, atol=tolerance, rtol=tolerance)
        text_tokens = text_tokens + 1
        table = cache.block_table(visual_table, visual, text_table, text_tokens, joint)
        lengths = text_tokens + visual * joint


def test_caches_that_do_not_share_an_allocation_are_refused():
    with pytest.raises(RuntimeError, match="do not share one allocation"):
        JointCache.of(torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM), torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM))
