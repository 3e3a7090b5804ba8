"""`apply_reduction` and `prefill_flops`: the requested ratio is met on the reference prompt, errors are clear."""

from __future__ import annotations

import warnings

import pytest
import torch

from visor import reduction
from visor.config import Schedule
from visor.flops import prompt_prefill_flops
from visor.reduction.budget import reference_inputs, reference_video_inputs


def model_for(method, stock, visor):
    return visor if method.startswith("visor+") else stock


def test_methods_are_the_issue_names():
    known = {"fastv", "random", "dart", "pyramiddrop", "visionzip", "hired", "sparsevlm", "shortv", "pool",
             "random-pre-llm", "visor+pool", "visor+visionzip"}
    assert set(reduction.METHODS) <= known and {"pool", "visor+pool", "fastv", "pyramiddrop"} <= set(reduction.METHODS)


@pytest.mark.parametrize("method", reduction.METHODS)
def test_ratio_is_reached_on_the_reference_prompt(stock, visor, method):
    base = model_for(method, stock, visor)
    inputs = reference_inputs(stock.config)
    full = int(prompt_prefill_flops(stock.config, inputs, Schedule.full(stock.config))[0])
    for ratio in (1.0, 2.0):
        reached = full / int(reduction.prefill_flops(reduction.apply_reduction(base, method, ratio), inputs)[0])
        if method.startswith("visor+"):
            assert reached >= ratio  # VISOR alone may already save more
        else:
            assert ratio <= reached < 1.25 * ratio


def test_ratio_one_is_the_unreduced_model(stock, batch):
    with torch.no_grad():
        for method in ("pool", "fastv", "pyramiddrop"):
            model = reduction.apply_reduction(stock, method, 1.0)
            assert torch.equal(reduction.prefill_flops(model, batch),
                               prompt_prefill_flops(stock.config, batch, Schedule.full(stock.config)))


def test_out_of_reach_warns_and_takes_the_strongest(stock):
    with pytest.warns(UserWarning, match="out of reach"):
        model = reduction.apply_reduction(stock, "fastv", 50.0)
    assert model.plan.details["keep"] < 0.01


def test_plain_models_count_as_themselves(stock, visor, batch):
    assert torch.equal(reduction.prefill_flops(stock, batch), prompt_prefill_flops(stock.config, batch, Schedule.full(stock.config)))
    assert torch.equal(reduction.prefill_flops(visor, batch), prompt_prefill_flops(visor.config, batch, Schedule.of(visor.config, visor.config.largest_configuration)))


def test_bad_input(stock, visor):
    with pytest.raises(ValueError, match="unknown method"):
        reduction.apply_reduction(stock, "tome", 2.0)
    with pytest.raises(ValueError, match="needs a VISOR model"):
        reduction.apply_reduction(stock, "visor+pool", 2.0)
    with pytest.raises(ValueError, match="needs a stock model"):
        reduction.apply_reduction(visor, "fastv", 2.0)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="ratio must be >= 1"):
        reduction.apply_reduction(stock, "pool", 0.5)


@pytest.mark.parametrize("method", reduction.METHODS)
def test_every_method_runs_as_the_demo_calls_it(stock, visor, batch, method):
    """apply_reduction → generate (greedy, pad/eos from the config) → prefill_flops per sample, at 4x."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 6-layer model cannot give every method 4x
        model = reduction.apply_reduction(model_for(method, stock, visor), method, 4.0)
    text_config = model.config.text_config
    output = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=text_config.pad_token_id,
                            eos_token_id=text_config.eos_token_id, return_dict_in_generate=True)
    assert output.sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 2)
    flops = reduction.prefill_flops(model, batch)
    assert flops.dtype == torch.long and flops.shape == (len(batch["input_ids"]),)
    assert (flops < prompt_prefill_flops(stock.config, batch, Schedule.full(stock.config))).all()


# ---- video methods ---------------------------------------------------------------------------------------------
def test_video_methods_stand_apart_and_run_on_llava_onevision_only(stock):
    from visor import presets

    assert not set(reduction.VIDEO_METHODS) & set(reduction.METHODS)
    assert reduction.video_methods_for(stock.config) == reduction.VIDEO_METHODS
    for preset in ("tiny-qwen2.5-vl", "tiny-internvl3"):
        assert reduction.video_methods_for(presets.PRESETS[preset](2)) == ()


@pytest.mark.parametrize("method", reduction.VIDEO_METHODS)
def test_video_ratio_is_reached_on_the_reference_video_prompt(stock, visor, method):
    base = model_for(method, stock, visor)
    inputs = reference_video_inputs(stock.config)
    full = int(prompt_prefill_flops(stock.config, inputs, Schedule.full(stock.config))[0])
    for ratio in (1.0, 2.0):
        reached = full / int(reduction.prefill_flops(reduction.apply_reduction(base, method, ratio), inputs)[0])
        assert reached >= ratio
        if not method.startswith("visor+") and "pool" not in method:  # a tiny frame pools to 16, 9, 4 or 1 tokens
            assert reached < 1.25 * ratio


@pytest.mark.parametrize("method", reduction.VIDEO_METHODS)
def test_every_video_method_runs_as_the_demo_calls_it(stock, visor, videos, method):
    """apply_reduction (matched on a batch) → generate → prefill_flops: less for every sample with a video, the base
    model's own for the sample with an image only."""
    batch, kinds = videos
    base = model_for(method, stock, visor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image-only sample keeps its cost: 3x may be out of reach
        model = reduction.apply_reduction(base, method, 3.0, inputs=batch)
    text_config = model.config.text_config
    output = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=text_config.pad_token_id,
                            eos_token_id=text_config.eos_token_id, return_dict_in_generate=True)
    assert output.sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + 2)
    flops, unreduced = reduction.prefill_flops(model, batch), reduction.prefill_flops(base, batch)
    with_video = torch.tensor(["video" in row for row in kinds])
    assert (flops[with_video] < unreduced[with_video]).all()
    assert torch.equal(flops[~with_video], unreduced[~with_video])


def test_video_bad_input(stock, visor, batch):
    with pytest.raises(ValueError, match="needs a VISOR model"):
        reduction.apply_reduction(stock, "visor+evs", 2.0)
    with pytest.raises(ValueError, match="needs a stock model"):
        reduction.apply_reduction(visor, "frames", 2.0)
    with pytest.raises(ValueError, match="need a prompt with video"):
        reduction.apply_reduction(stock, "evs", 2.0, inputs=batch)
