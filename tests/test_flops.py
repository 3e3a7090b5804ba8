"""The analytic FLOP counter equals `FlopCounterMode` on real forwards, and its algebra is what `visor.flops` says."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaOnevisionForConditionalGeneration

from visor import VisorConfig, VisorForConditionalGeneration, presets
from visor.config import Schedule
from visor.flops import (
    decode_flops_per_token,
    image_tokens,
    kv_cache_bytes,
    llm_prefill_flops,
    nominal_vision_flops,
    prompt_token_counts,
    savings,
    video_tokens,
    video_vision_flops,
    vision_flops,
)

NEXT_TOKEN = 7  # any text id of the tiny vocabulary


# ---- random tiny models ---------------------------------------------------------------------------------------------
def random_llava_config(rng: random.Random):
    """A tiny LLaVA-OV config with a random Qwen2 or Llama text model (layers, width, heads, GQA ratio, head_dim)."""
    family = rng.choice([presets.tiny, presets.tiny_llama])
    config = family(rng.randint(2, 5))
    kv_heads = rng.choice([1, 2, 4])
    heads = kv_heads * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 16, 24])
    overrides = dict(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=rng.choice([64, 100, 256]),
    )
    if family is presets.tiny_llama and rng.random() < 0.5:
        overrides["hidden_size"] = rng.choice([48, 96])  # Llama allows head_dim × heads != hidden_size
        overrides["head_dim"] = head_dim
    elif family is presets.tiny_llama:
        overrides["head_dim"] = None
    text = config.text_config
    config.text_config = type(text)(**{**text.to_dict(), **overrides})
    config.vision_config.num_hidden_layers = rng.randint(1, 2)
    return config


def random_visor_options(rng: random.Random, text_config) -> dict:
    """A random layer schedule (possibly no CA layer), CA key/value heads and random CA-MLP / CPE options."""
    num_layers, kv_heads = text_config.num_hidden_layers, text_config.num_key_value_heads
    layers = list(range(num_layers))
    cross = sorted(rng.sample(layers, rng.randint(0, max(1, num_layers // 2))))
    free = [layer for layer in layers if layer not in cross]
    return dict(
        cross_attention_layers=cross,
        self_attention_layers=rng.sample(free, rng.randint(1, len(free))),
        cross_attention_mlp=rng.random() < 0.5,
        position_encoding=rng.random() < 0.5,
        position_encoding_kernel=rng.choice([3, 5, 7]),
        cross_attention_key_value_heads=rng.choice([None] + [h for h in range(1, kv_heads + 1) if kv_heads % h == 0]),
    )


def build(seed: int):
    """Stock model (eager attention, so the counter sees the attention matmuls), its VISOR twin, and a prompt."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = random_llava_config(rng)
    stock = LlavaOnevisionForConditionalGeneration(config).eval()
    stock.set_attn_implementation("eager")
    visor = VisorForConditionalGeneration.from_stock(stock, **random_visor_options(rng, config.text_config)).eval()
    height, width = rng.randint(24, 128), rng.randint(24, 128)
    crops, visual = image_tokens(config, (height, width))
    before, after = rng.randint(0, 6), rng.randint(1, 12)
    ids = [rng.randrange(5, 500) for _ in range(before)] + [presets.TINY_IMAGE_TOKEN_ID] * visual
    ids += [rng.randrange(5, 500) for _ in range(after)]
    prompt = dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.randn(1, crops, 3, 64, 64),
        image_sizes=torch.tensor([[height, width]]),
    )
    return stock, visor, prompt, (height, width), visual, before + after


def counted(run) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def assert_exact(measured: int, analytic: int) -> None:
    assert abs(measured - analytic) <= 0.01 * measured  # the tolerance `visor.flops` promises …
    assert measured == analytic  # … and in fact exact


# ---- prefill against FlopCounterMode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_prefill_matches_flop_counter(seed):
    stock, visor, prompt, image_size, visual, text = build(seed)
    length = visual + text
    vision = vision_flops(stock.config, image_size).total
    assert_exact(counted(lambda: stock(**prompt)), vision + llm_prefill_flops(stock.config, visual, text, Schedule.full(stock.config), length).total)
    for index in range(len(visor.config.configurations)):
        keep = index % 2  # alternate a training-style forward (logits everywhere) and a generation prefill (1)
        measured = counted(lambda: visor(**prompt, configuration=index, logits_to_keep=keep))
        analytic = llm_prefill_flops(visor.config, visual, text, Schedule.of(visor.config, index), logits_tokens=keep or length)
        assert_exact(measured, vision + analytic.total)


def test_dense_visor_counts_as_the_stock_model_plus_its_position_encoding():
    stock, _, prompt, image_size, visual, text = build(100)
    dense = VisorForConditionalGeneration.from_stock(stock, VisorConfig.dense(stock.config)).eval()
    vision = vision_flops(stock.config, image_size).total
    analytic = llm_prefill_flops(dense.config, visual, text, Schedule.of(dense.config, 0), logits_tokens=1)
    assert_exact(counted(lambda: dense(**prompt, logits_to_keep=1)), vision + analytic.total)
    stock_count = llm_prefill_flops(stock.config, visual, text, Schedule.full(stock.config), logits_tokens=1)
    assert analytic.total == stock_count.total + analytic.parts["position_encoding"]
    assert analytic.parts["position_encoding"] == 2 * visual * stock.config.text_config.hidden_size * 7


def test_image_tokens_match_the_vision_path():
    stock = LlavaOnevisionForConditionalGeneration(presets.tiny(2)).eval()
    for height, width in [(64, 64), (64, 128), (128, 64), (300, 90), (33, 150), (128, 128)]:
        crops, visual = image_tokens(stock.config, (height, width))
        with torch.no_grad():
            features = stock.model.get_image_features(
                torch.randn(1, crops, 3, 64, 64), torch.tensor([[height, width]]), return_dict=True
            ).pooler_output
        assert visual == features[0].shape[0]
    with pytest.raises(ValueError, match="positive"):
        image_tokens(stock.config, (0, 64))


# ---- video prompts against FlopCounterMode ----------------------------------------------------------------------------
def build_video(seed: int):
    """`build`'s models and a prompt with a video of 1-4 frames, after an image on every other seed."""
    stock, visor, prompt, image_size, visual, text = build(seed)
    rng = random.Random(seed)
    frames, with_image = rng.randint(1, 4), seed % 2 == 0
    video_count = video_tokens(stock.config, frames).visual_tokens
    ids = prompt["input_ids"][0].tolist()
    if not with_image:
        ids = [token for token in ids if token != presets.TINY_IMAGE_TOKEN_ID]
        prompt = dict(input_ids=prompt["input_ids"])
        visual = 0
    ids += [presets.TINY_VIDEO_TOKEN_ID] * video_count + [rng.randrange(5, 500) for _ in range(3)]
    prompt = dict(prompt, input_ids=torch.tensor([ids]), pixel_values_videos=torch.randn(1, frames, 3, 64, 64))
    vision = video_vision_flops(stock.config, frames).total + (vision_flops(stock.config, image_size).total
                                                                if with_image else 0)
    return stock, visor, prompt, vision, visual + video_count, text + 3


@pytest.mark.parametrize("seed", range(8))
def test_video_prefill_matches_flop_counter(seed):
    """A video's vision work (every frame through SigLIP and the projector) and its tokens (frames × pooled tokens
    + one newline, visual like an image's) are counted exactly, stock and in every VISOR configuration."""
    stock, visor, prompt, vision, visual, text = build_video(seed)
    assert prompt_token_counts(stock.config, prompt) == (torch.tensor([visual]), torch.tensor([text]))
    full = llm_prefill_flops(stock.config, visual, text, Schedule.full(stock.config), visual + text)
    assert_exact(counted(lambda: stock(**prompt)), vision + full.total)
    for index in range(len(visor.config.configurations)):
        analytic = llm_prefill_flops(visor.config, visual, text, Schedule.of(visor.config, index), logits_tokens=1)
        assert_exact(counted(lambda: visor(**prompt, configuration=index, logits_to_keep=1)), vision + analytic.total)


def test_video_tokens_match_the_video_path():
    stock = LlavaOnevisionForConditionalGeneration(presets.tiny(2)).eval()
    for frames in (1, 3, 8):
        counted_frames, visual = video_tokens(stock.config, frames)
        with torch.no_grad():
            features = stock.model.get_video_features(torch.randn(1, frames, 3, 64, 64), return_dict=True)
        assert (counted_frames, visual) == (frames, features.pooler_output.shape[1])
        per_crop = vision_flops(stock.config, (64, 64)).total // image_tokens(stock.config, (64, 64)).crops
        assert video_vision_flops(stock.config, frames).total == frames * per_crop  # a frame costs one crop


# ---- decoding against FlopCounterMode ---------------------------------------------------------------------------------
def counted_decode_steps(model, prompt, steps: int = 2, **options) -> list[int]:
    """FLOPs of each of `steps` single-token decoding steps after a cached prefill."""
    with torch.no_grad():
        cache = model(**prompt, use_cache=True, logits_to_keep=1, **options).past_key_values
    counts = []
    for _ in range(steps):
        step = dict(input_ids=torch.tensor([[NEXT_TOKEN]]), past_key_values=cache, use_cache=True)
        counts.append(counted(lambda: model(**step)))
    return counts


@pytest.mark.parametrize("seed", range(4))
def test_decode_step_matches_flop_counter(seed):
    stock, visor, prompt, _, visual, text = build(seed)
    for step, measured in enumerate(counted_decode_steps(stock, prompt)):
        assert_exact(measured, decode_flops_per_token(stock.config, visual, text, Schedule.full(stock.config), step).total)
    for index in range(len(visor.config.configurations)):
        for step, measured in enumerate(counted_decode_steps(visor, prompt, configuration=index)):
            assert_exact(measured, decode_flops_per_token(visor.config, visual, text, Schedule.of(visor.config, index), step).total)


# ---- the KV cache's bytes against a real cache -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 10, 12])  # 10 and 12: CA blocks with fewer K/V heads than their host
def test_kv_cache_bytes_match_the_cache_a_prefill_leaves(seed):
    """fp32 keys/values: the stock model's cache in total, VISOR's split into visual and text, per configuration
    (random CA layers and CA key/value heads)."""
    stock, visor, prompt, _, visual, text = build(seed)
    with torch.no_grad():
        stock_cache = stock(**prompt, use_cache=True, logits_to_keep=1).past_key_values
        stock_bytes = sum(t.numel() * t.element_size() for layer in stock_cache.layers for t in (layer.keys, layer.values))
        assert stock_bytes == sum(kv_cache_bytes(stock.config, visual, text, Schedule.full(stock.config), 4).values())
        for index in range(len(visor.config.configurations)):
            cache = visor(**prompt, configuration=index, use_cache=True, logits_to_keep=1).past_key_values
            assert cache.nbytes() == kv_cache_bytes(visor.config, visual, text, Schedule.of(visor.config, index), 4)
    assert kv_cache_bytes(visor.config, visual, text, Schedule.text_only(), 4)["visual"] == 0


# ---- algebra at real shapes (nothing is built) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    return VisorConfig.from_stock_config(presets.llava_ov_0_5b())


def test_text_only_below_every_configuration_below_full(real):
    visual, text = 7290, 64
    costs = [llm_prefill_flops(real, visual, text, Schedule.of(real, index)).total for index in range(len(real.configurations))]
    floor = llm_prefill_flops(real, visual, text, Schedule.text_only()).total
    full = llm_prefill_flops(real, visual, text, Schedule.full(real)).total
    assert floor < costs[0] and costs[-1] < full
    assert costs == sorted(costs) and len(set(costs)) == len(costs)  # nested configurations: each SA layer costs
    assert llm_prefill_flops(real, 0, text, Schedule.full(real)).total == floor


def schedule(config, configuration) -> Schedule:
    """A configuration index, "full" or "text-only" as the schedule it names."""
    named = {"full": Schedule.full, "text-only": lambda config: Schedule.text_only()}
    return named[configuration](config) if configuration in named else Schedule.of(config, configuration)


def test_ca_only_is_linear_and_full_is_quadratic_in_visual_tokens(real):
    def cost(configuration, visual):
        return llm_prefill_flops(real, visual, 64, schedule(real, configuration)).total

    for visual in (729, 2916):
        assert cost(0, 3 * visual) - cost(0, 2 * visual) == cost(0, 2 * visual) - cost(0, visual)  # affine
        assert cost("full", 3 * visual) - cost("full", 2 * visual) > cost("full", 2 * visual) - cost("full", visual)
    # CA-only: every visual token costs the CPE, k/v in each CA layer, and its share of the text's CA attention.
    layers, width = len(real.cross_attention_layers), real.text_config.hidden_size
    kv_width = real.text_config.num_key_value_heads * width // real.text_config.num_attention_heads
    per_visual = 2 * width * 7 + layers * (2 * 2 * width * kv_width + 4 * 64 * width)
    assert cost(0, 1001) - cost(0, 1000) == per_visual


def test_visual_decode_cost_shrinks_by_the_interaction_layers(real):
    """Each cached visual token costs attention in L layers for the full model, |CA| + |SA used| for VISOR."""
    def slope(configuration):
        return (decode_flops_per_token(real, 2000, 64, schedule(real, configuration)).total
                - decode_flops_per_token(real, 1000, 64, schedule(real, configuration)).total)

    per_layer = slope("full") // real.num_layers
    assert slope("full") == real.num_layers * per_layer == 4 * real.text_config.hidden_size * 1000 * real.num_layers
    for index, layers in enumerate(real.configurations):
        assert slope(index) == (len(real.cross_attention_layers) + len(layers)) * per_layer
    assert slope("text-only") == 0


def test_decode_step_adds_one_text_key_everywhere(real):
    step0 = decode_flops_per_token(real, 729, 64, Schedule.of(real, 3), step=0).total
    step5 = decode_flops_per_token(real, 729, 64, Schedule.of(real, 3), step=5).total
    assert step5 - step0 == 5 * real.num_layers * 4 * real.text_config.hidden_size


def test_vision_flops_scale_with_crops(real):
    """Per image, as many crops' worth as the image has crops; a benchmark's N tokens stand for ceil(N / 729)."""
    one = vision_flops(real, (384, 384))  # the base view and one hi-res crop
    assert image_tokens(real, (384, 384)).crops == 2
    large = vision_flops(real, (1152, 1152))
    assert large.total == image_tokens(real, (1152, 1152)).crops * one.total // 2
    assert set(one.parts) == {"vision_tower", "projector"} and one.parts["vision_tower"] > one.parts["projector"] > 0
    assert nominal_vision_flops(real, 729).total == one.total // 2
    assert nominal_vision_flops(real, 730).total == nominal_vision_flops(real, 1458).total == one.total


def test_savings_is_a_ratio_of_sums():
    assert savings([10, 30], [5, 5]) == 4.0
    with pytest.raises(ValueError, match="one full and one method"):
        savings([1, 2], [1])
    with pytest.raises(ValueError, match="zero"):
        savings([1], [0])


def test_bad_arguments_raise_clear_errors(real):
    with pytest.raises(ValueError, match="does not exist"):
        Schedule.of(real, len(real.configurations))
    with pytest.raises(ValueError, match="does not exist"):
        Schedule.of(real, True)
    with pytest.raises(ValueError, match="visual_tokens must be a non-negative"):
        llm_prefill_flops(real, -1, 10, Schedule.full(real))
    with pytest.raises(TypeError):
        llm_prefill_flops(real, 10, 10)  # the schedule is never implied
    assert Schedule.of(real, real.largest_configuration).self_attention == frozenset(real.configurations[-1])
