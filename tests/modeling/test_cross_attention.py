"""The CA block: a gated no-op at the start, masked by prompt order, zero (never NaN) for rows with nothing to read."""

from __future__ import annotations

import copy

import pytest
import torch

from visor import VisorForConditionalGeneration
from visor.modeling.cross_attention import CrossAttentionBlock

TEXT, VISUAL = 6, 10


@pytest.fixture(scope="module")
def stock(stock_factory):
    return stock_factory("tiny", num_layers=2)


def make_block(stock, gate=True, mlp=False, attention="eager", seed=0) -> CrossAttentionBlock:
    """A block on layer 0 with random projections (a freshly initialised block would hide masking bugs)."""
    torch.manual_seed(seed)
    config = stock.config.text_config
    config._attn_implementation = attention
    block = CrossAttentionBlock(stock.model.language_model.layers[0], config, gate=gate, mlp=mlp)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.2)
    return block.eval()


def streams(stock, seed=1):
    """Random text and visual streams (2 samples) with their rotary (cos, sin), visual tokens first."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(2, TEXT, 128, generator=generator)
    visual = torch.randn(2, VISUAL, 128, generator=generator)
    rotary = stock.model.language_model.rotary_emb
    text_rope = rotary(text, torch.arange(VISUAL, VISUAL + TEXT).expand(2, -1))
    visual_rope = rotary(visual, torch.arange(VISUAL).expand(2, -1))
    return text, visual, text_rope, visual_rope


def inputs(stock, block, allowed=None, seed=1):
    text, visual, text_rope, visual_rope = streams(stock, seed)
    if allowed is None:
        allowed = torch.ones(2, TEXT, VISUAL, dtype=torch.bool)
    keys, values = block.visual_keys_values(visual, visual_rope)
    return text, keys, values, allowed, text_rope


def run(block, text, keys, values, allowed, text_rope):
    with torch.no_grad():
        return block(text, keys, values, allowed, text_rope)


def set_gates(block, value):
    with torch.no_grad():
        for gate in (block.attention_gate, block.mlp_gate):
            if gate is not None:
                gate.fill_(value)


@pytest.mark.parametrize("mlp", [False, True])
def test_zero_gates_make_the_block_exactly_a_no_op(stock, mlp):
    block = make_block(stock, mlp=mlp)
    set_gates(block, 0.0)
    text, *rest = inputs(stock, block)
    assert torch.equal(run(block, text, *rest), text)
    set_gates(block, 0.5)
    assert (run(block, text, *rest) - text).abs().max() > 1e-3


def test_gate_scales_the_update_by_its_tanh(stock):
    block = make_block(stock)
    text, *rest = inputs(stock, block)
    set_gates(block, 0.3)
    small = run(block, text, *rest) - text
    set_gates(block, 1.1)
    large = run(block, text, *rest) - text
    torch.testing.assert_close(large / torch.tanh(torch.tensor(1.1)), small / torch.tanh(torch.tensor(0.3)),
                               atol=1e-5, rtol=1e-5)


def test_ungated_block_is_active_from_the_start(stock):
    block = make_block(stock, gate=False)
    assert block.attention_gate is None
    text, *rest = inputs(stock, block)
    assert (run(block, text, *rest) - text).abs().max() > 1e-3


def test_projections_follow_the_host_gqa_shapes(stock):
    block = make_block(stock)
    host = stock.model.language_model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(block, name).weight.shape == getattr(host, name).weight.shape
        assert (getattr(block, name).bias is None) == (getattr(host, name).bias is None)
    _, keys, values, _, _ = inputs(stock, block)
    assert keys.shape == values.shape == (2, stock.config.text_config.num_key_value_heads, VISUAL, block.head_dim)


def test_rows_that_see_no_visual_token_get_exactly_zero_and_no_nan(stock):
    block = make_block(stock)
    set_gates(block, 0.8)
    allowed = torch.ones(2, TEXT, VISUAL, dtype=torch.bool)
    allowed[0, :3] = False  # the first three text tokens of sample 0 come before its image
    allowed[1] = False  # sample 1 never sees an image
    text, keys, values, allowed, rope = inputs(stock, block, allowed)
    output = run(block, text, keys, values, allowed, rope)
    assert torch.isfinite(output).all()
    assert torch.equal(output[0, :3], text[0, :3])
    assert torch.equal(output[1], text[1])
    assert (output[0, 3:] - text[0, 3:]).abs().amin(dim=-1).gt(0).any()


def test_masked_visual_tokens_do_not_reach_the_text(stock):
    block = make_block(stock)
    set_gates(block, 0.8)
    allowed = torch.ones(2, TEXT, VISUAL, dtype=torch.bool)
    allowed[:, :, 5:] = False
    text, keys, values, allowed, rope = inputs(stock, block, allowed)
    changed_keys, changed_values = keys.clone(), values.clone()
    changed_keys[:, :, 5:] += 3.0
    changed_values[:, :, 5:] -= 3.0
    assert torch.equal(run(block, text, keys, values, allowed, rope),
                       run(block, text, changed_keys, changed_values, allowed, rope))
    changed_values[:, :, 0] += 3.0  # an allowed token does reach the text
    assert not torch.equal(run(block, text, keys, values, allowed, rope),
                           run(block, text, changed_keys, changed_values, allowed, rope))


def test_no_visual_tokens_at_all_leaves_text_unchanged(stock):
    block = make_block(stock)
    set_gates(block, 0.8)
    text = torch.randn(2, TEXT, 128)
    empty = torch.zeros(2, block.k_proj.out_features // block.head_dim, 0, block.head_dim)
    rope = stock.model.language_model.rotary_emb(text, torch.arange(TEXT).expand(2, -1))
    assert torch.equal(run(block, text, empty, empty, torch.zeros(2, TEXT, 0, dtype=torch.bool), rope), text)


def test_visual_keys_values_accept_zero_visual_tokens(stock):
    """A text-only prompt reaches the CA blocks with (B, 0, d) visual states; keys/values must be (B, H_kv, 0, D)."""
    block = make_block(stock)
    visual = torch.zeros(2, 0, 128)
    rope = stock.model.language_model.rotary_emb(visual, torch.zeros(2, 0, dtype=torch.long))
    keys, values = block.visual_keys_values(visual, rope)
    assert keys.shape == values.shape == (2, stock.config.text_config.num_key_value_heads, 0, block.head_dim)


def test_eager_and_sdpa_agree(stock):
    eager = make_block(stock, attention="eager")
    set_gates(eager, 0.8)
    allowed = torch.rand(2, TEXT, VISUAL, generator=torch.Generator().manual_seed(3)) > 0.4
    allowed[0, 0] = False
    arguments = inputs(stock, eager, allowed)
    expected = run(eager, *arguments)
    eager.config._attn_implementation = "sdpa"
    try:
        actual = run(eager, *arguments)
    finally:
        eager.config._attn_implementation = "eager"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_host_initialisation_copies_the_host_attention(stock):
    stock = copy.deepcopy(stock)
    with torch.no_grad():  # trained norms are not all ones, so a norm left at its default would show
        for layer in stock.model.language_model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    model = VisorForConditionalGeneration.from_stock(stock, cross_attention_init="host", cross_attention_gate=False)
    layers = model.model.language_model.layers
    for index, block in model.cross_attention.items():
        host = layers[int(index)]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(block, name).weight, getattr(host.self_attn, name).weight)
        assert torch.equal(block.text_norm.weight, host.input_layernorm.weight)
        assert torch.equal(block.visual_norm.weight, host.input_layernorm.weight)
        assert block.attention_gate is None


def test_zero_initialisation_closes_every_gate(stock):
    model = VisorForConditionalGeneration.from_stock(stock, cross_attention_mlp=True)
    assert len(model.cross_attention) > 0
    for block in model.cross_attention.values():
        assert block.attention_gate.item() == 0.0 and block.mlp_gate.item() == 0.0


def test_fewer_key_value_heads_pool_the_host_heads(stock):
    """With identical host key/value heads, mean pooling loses nothing: the 1-head block equals the 2-head one."""
    host = stock.model.language_model.layers[0]
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            weight = getattr(host.self_attn, name).weight
            weight[weight.shape[0] // 2:] = weight[: weight.shape[0] // 2]
    config = stock.config.text_config
    blocks = []
    for heads in (None, 1):
        block = CrossAttentionBlock(host, config, gate=False, key_value_heads=heads)
        block.copy_host(host)
        blocks.append(block.eval())
    assert blocks[1].k_proj.out_features == blocks[0].k_proj.out_features // 2
    outputs = [run(block, *inputs(stock, block)) for block in blocks]
    torch.testing.assert_close(outputs[1], outputs[0])


def test_key_value_heads_must_divide_the_hosts(stock):
    with pytest.raises(ValueError, match="must divide"):
        CrossAttentionBlock(stock.model.language_model.layers[0], stock.config.text_config, key_value_heads=3)
