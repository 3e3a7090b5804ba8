"""`visor bench --engine vllm` on the tiny preset: a row per model and visual-token count, KV bytes read from vLLM's
own pool that agree with VISOR's counter, and its outputs. Skipped without vLLM, never in CI (`make test-serve`)."""

from __future__ import annotations

import json
import os

import pytest

if not os.environ.get("VISOR_REQUIRE_VLLM"):
    pytest.importorskip("vllm")

from visor.benchmarking import BenchPlan  # noqa: E402
from visor.config import Schedule  # noqa: E402
from visor.flops import kv_cache_bytes  # noqa: E402
from visor.integrations.vllm.bench import engine_table, run_engine_bench, write_engine_outputs  # noqa: E402

BLOCK = 128  # vLLM's CPU block size for these shapes


def test_engine_bench_measures_every_row(tmp_path):
    plan = BenchPlan(preset="tiny", visual_tokens=(136, 500), text_tokens=16, repeats=1, decode_tokens=3,
                     configurations=(0, 2), dtype="float32", batch_sizes=(1, 3), kv_budget_gib=0.01)
    rows = run_engine_bench(plan)
    assert [(row.visual_tokens, row.method, row.configuration) for row in rows] == [
        (visual, method, index) for visual in (136, 500)
        for method, index in (("native", None), ("full", None), ("visor", 0), ("visor", 2))]
    text = plan.text_tokens + 1 + plan.decode_tokens
    for row in rows:
        if row.method == "native":  # the stock model caches the image's tokens with the text, in every layer
            layers, heads, head_dim = 6, 2, 32
            blocks = -(-(row.visual_tokens + text) // BLOCK)
            assert (row.kv_bytes_visual, row.kv_bytes_text) == (0, layers * blocks * BLOCK * heads * head_dim * 2 * 4)
        else:
            schedule = (Schedule.full(plan.config) if row.method == "full"
                        else Schedule.of(plan.config, row.configuration))
            expected = kv_cache_bytes(plan.config, -(-row.visual_tokens // BLOCK) * BLOCK, -(-text // BLOCK) * BLOCK,
                                      schedule, element_size=4)
            assert (row.kv_bytes_visual, row.kv_bytes_text) == (expected["visual"], expected["text"])
        assert [item.requests for item in row.concurrent] == [1, 3]
        assert all(item.decode_tokens_per_s > 0 for item in row.concurrent) and row.time_to_first_token_s > 0
    for visual in (136, 500):
        native, full, ca_only, largest = (row for row in rows if row.visual_tokens == visual)
        assert native.flops_ratio == native.kv_ratio == 1.0 == full.flops_ratio  # speed-ups against the native row
        assert ca_only.kv_reserved_bytes < largest.kv_reserved_bytes < full.kv_reserved_bytes
        assert ca_only.requests_in_budget >= largest.requests_in_budget >= full.requests_in_budget > 0
    paths = write_engine_outputs(rows, tmp_path)
    assert [path.name for path in paths] == ["bench.json", "decode.png"]
    assert len(json.loads(paths[0].read_text())) == len(rows)
    assert "VISOR 0 (0 SA)" in engine_table(rows) and "stock (vLLM's own)" in engine_table(rows)


def test_the_native_row_serves_the_stock_language_model_of_every_family():
    """Its config is the stock text model's, as a plain causal LM of the class vLLM serves natively."""
    from visor import presets
    from visor.integrations.vllm.bench import native_text_config

    for name in ("tiny", "tiny-llama", "tiny-qwen2.5-vl", "tiny-qwen3-vl"):
        config = presets.PRESETS[name]()
        native = native_text_config(config)
        assert native.model_type in ("qwen2", "llama", "qwen3")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size"):
            assert getattr(native, key) == getattr(config.text_config, key)
        assert "mrope_section" not in native.rope_parameters
