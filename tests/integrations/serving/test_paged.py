"""VISOR's caches in vLLM's blocks (`visor.integrations.vllm.paged`): what is filed at slots reads back per
request, in order, zero past each request's length, whatever the blocks held before. Plain torch: runs anywhere."""

from __future__ import annotations

import torch

from visor.integrations.vllm import paged


def test_filed_tokens_read_back_per_request_in_order():
    torch.manual_seed(0)
    blocks, heads, block_size, head_dim = 12, 2, 4, 3
    kv_cache = torch.full((blocks, heads, block_size, 2 * head_dim), float("nan"))  # blocks never written: garbage
    block_table = torch.tensor([[7, 2, 9], [4, 11, 0]])
    lengths = torch.tensor([10, 5])
    stored = []
    for row, length in enumerate(lengths.tolist()):
        keys, values = torch.randn(length, heads, head_dim), torch.randn(length, heads, head_dim)
        order = torch.arange(length)
        paged.write(kv_cache, block_table[row][order // block_size] * block_size + order % block_size, keys, values)
        stored.append((keys, values))
    keys, values, valid = paged.read(kv_cache, block_table, lengths)
    assert keys.shape == values.shape == (2, heads, 10, head_dim)
    assert valid.tolist() == [[True] * 10, [True] * 5 + [False] * 5]
    for row, (row_keys, row_values) in enumerate(stored):
        length = len(row_keys)
        assert torch.equal(keys[row, :, :length], row_keys.transpose(0, 1))
        assert torch.equal(values[row, :, :length], row_values.transpose(0, 1))
    assert torch.equal(keys[1, :, 5:], torch.zeros(heads, 5, head_dim))  # past the end: zeros, not the NaNs there
