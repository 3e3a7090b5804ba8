"""The SA layers' caches in vLLM's blocks (`visor.integrations.vllm.paged`): what is filed at slots is gathered back
per request, in order, zero past each request's length whatever the blocks held before, and one query attends to
several such parts as one softmax. Plain torch: runs anywhere."""

from __future__ import annotations

import torch

from visor.integrations.vllm import paged

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM = 12, 2, 4, 3


def _filed(block_table: torch.Tensor, lengths: torch.Tensor, kv_cache: torch.Tensor) -> list:
    stored = []
    for row, length in enumerate(lengths.tolist()):
        keys, values = torch.randn(length, HEADS, HEAD_DIM), torch.randn(length, HEADS, HEAD_DIM)
        order = torch.arange(length)
        paged.write(kv_cache, block_table[row][order // BLOCK_SIZE] * BLOCK_SIZE + order % BLOCK_SIZE, keys, values)
        stored.append((keys, values))
    return stored


def test_filed_tokens_gather_back_per_request_in_order():
    torch.manual_seed(0)
    kv_cache = torch.full((BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM), float("nan"))  # never written: garbage
    block_table = torch.tensor([[7, 2, 9], [4, 11, 0]])
    lengths = torch.tensor([10, 5])
    stored = _filed(block_table, lengths, kv_cache)
    states, valid = paged.gather(kv_cache, block_table, lengths)
    assert states.shape == (2, HEADS, 12, 2 * HEAD_DIM)
    assert valid.tolist() == [[True] * 10 + [False] * 2, [True] * 5 + [False] * 7]
    for row, (keys, values) in enumerate(stored):
        assert torch.equal(states[row, :, :len(keys), :HEAD_DIM], keys.transpose(0, 1))
        assert torch.equal(states[row, :, :len(keys), HEAD_DIM:], values.transpose(0, 1))
    assert torch.equal(states[1, :, 5:], torch.zeros(HEADS, 7, 2 * HEAD_DIM))  # past the end: zeros, not NaN


def test_one_query_attends_to_two_caches_as_one_softmax():
    """A query over a visual and a text cache equals plain attention over both caches' tokens together (GQA: 4
    query heads on 2 key/value heads), whatever the blocks held before."""
    torch.manual_seed(1)
    visual_cache = torch.full((BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM), float("nan"))
    text_cache = torch.full((BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM), float("nan"))
    visual_table, text_table = torch.tensor([[3, 5, 8], [1, 6, 10]]), torch.tensor([[2, 0], [9, 4]])
    visual_lengths, text_lengths = torch.tensor([9, 0]), torch.tensor([6, 3])
    visual, text = _filed(visual_table, visual_lengths, visual_cache), _filed(text_table, text_lengths, text_cache)
    query = torch.randn(2, 2 * HEADS, HEAD_DIM)
    out = paged.attend(query, [paged.gather(visual_cache, visual_table, visual_lengths),
                               paged.gather(text_cache, text_table, text_lengths)], scale=0.5)
    for row in range(2):
        keys = torch.cat([visual[row][0], text[row][0]]).transpose(0, 1).repeat_interleave(2, dim=0)
        values = torch.cat([visual[row][1], text[row][1]]).transpose(0, 1).repeat_interleave(2, dim=0)
        weights = torch.softmax((query[row][:, None] @ keys.transpose(1, 2))[:, 0] * 0.5, dim=-1)
        expected = (weights[:, None] @ values)[:, 0]
        torch.testing.assert_close(out[row], expected)
