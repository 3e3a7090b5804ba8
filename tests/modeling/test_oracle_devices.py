"""The oracle on every device and dtype the machine has: dense VISOR equals the stock model in bf16 on the CPU, and
in fp32 and bf16 on CUDA when a GPU is present (those cases are skipped without one).

Tolerances: fp32 as the CPU oracle (1e-5). bf16 keeps 8 significant bits (machine epsilon 2^-7), so two models
that compute the same thing but order a reduction differently may disagree by a rounding or two of the largest
logit: the bound is 2 epsilons of it. On this project's CPUs the difference measured was exactly 0; greedy tokens
must match exactly everywhere.
"""

from __future__ import annotations

import pytest
import torch

from visor import VisorConfig, VisorForConditionalGeneration, presets

CASES = [("cpu", torch.bfloat16), ("cuda", torch.float32), ("cuda", torch.bfloat16)]


def tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    return 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * float(reference.abs().max())


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0]}-{str(case[1]).removeprefix('torch.')}")
def on_device(request, stock_factory, batch_factory):
    device, dtype = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    stock = stock_factory("tiny", num_layers=4, attention="sdpa")
    batch = batch_factory(stock)
    dense = VisorForConditionalGeneration.from_stock(stock, VisorConfig.dense(stock.config)).eval()
    batch = {key: value.to(device, dtype) if value.is_floating_point() else value.to(device) for key, value in batch.items()}
    return stock.to(device, dtype), dense.to(device, dtype), batch, dtype


@torch.no_grad()
def test_dense_logits_equal_stock(on_device):
    stock, dense, batch, dtype = on_device
    valid = batch["attention_mask"].bool()
    expected, actual = stock(**batch).logits[valid].float(), dense(**batch).logits[valid].float()
    torch.testing.assert_close(actual, expected, atol=tolerance(dtype, expected), rtol=0)


@torch.no_grad()
def test_dense_greedy_generation_equals_stock(on_device):
    stock, dense, batch, _ = on_device
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=presets.TINY_PAD_TOKEN_ID)
    assert torch.equal(dense.generate(**batch, **options), stock.generate(**batch, **options))
