"""The Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): dense VISOR equals the stock model, M-RoPE positions
survive the split into streams and the cache, DeepStack and q/k norms reach every layer kind, mixed batches,
checkpoints, the in-LLM baselines, and clear errors for what the port refuses."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import family_checks as checks
from visor import presets
from visor.backbones import backbone_for, family
from visor.flops import nominal_vision_flops, vision_flops
from visor.modeling.layers import head_states
from visor.reduction import fastv, pyramiddrop, shortv, sparsevlm
from visor.reduction.fastv import last_token_attention
from visor.reduction.pruned import PruningPlan, pruned

IMAGE = presets.TINY_IMAGE_TOKEN_ID
START, END = presets.TINY_VISION_START_TOKEN_ID, presets.TINY_VISION_END_TOKEN_ID
PAD, BOS, FIRST_WORD_ID = presets.TINY_PAD_TOKEN_ID, 1, 5
ATOL = checks.ATOL
FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"]
# Image (height, width) per sample: two images of different sizes, one, none (text only), and three.
IMAGES = [[(64, 96), (128, 64)], [(96, 96)], [], [(64, 64), (80, 112), (64, 64)]]


def build_stock(preset: str, attention: str = "eager", num_layers: int = 6, seed: int = 0):
    config = presets.PRESETS[preset](num_layers)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return family(config).BACKBONE.stock_model_class(config).eval()


def build_batch(stock, images=IMAGES, padding: str = "left", seed: int = 1) -> dict[str, torch.Tensor]:
    """Prompts `[BOS, words…] (<start> <image>×n <end> words…)…`, with the grids and patches the stock processor's
    geometry gives each image size (random pixels), padded on `padding`'s side."""
    backbone = backbone_for(stock.config)
    vision = stock.config.vision_config
    generator = torch.Generator().manual_seed(seed)
    vocab = stock.config.text_config.vocab_size

    def words(count):
        return torch.randint(FIRST_WORD_ID, vocab - 2, (count,), generator=generator).tolist()

    prompts, grids = [], []
    for row, sample in enumerate(images):
        prompt = [BOS] + words(3)
        for size in sample:
            height, width = backbone.resized(size)
            grids.append((1, height // vision.patch_size, width // vision.patch_size))
            prompt += [START] + [IMAGE] * backbone.image_tokens(size).visual_tokens + [END] + words(2 + row)
        prompts.append(prompt + words(4))
    input_ids, attention_mask = checks.padded(prompts, padding, PAD)
    grid = torch.tensor(grids)
    features = 3 * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(int(grid.prod(dim=-1).sum()), features, generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=grid,
                mm_token_type_ids=(input_ids == IMAGE).int())


@pytest.fixture(scope="module", params=FAMILIES)
def stock(request):
    return build_stock(request.param)


@pytest.fixture(scope="module")
def batch(stock):
    return build_batch(stock)


@pytest.fixture(scope="module")
def sparse(stock):
    return checks.sparse_of(stock)


# ---- the oracle ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_dense_logits_and_loss_equal_stock(preset, attention, padding):
    stock = build_stock(preset, attention)
    checks.dense_logits_and_loss_equal_stock(stock, build_batch(stock, padding=padding), IMAGE, len(IMAGES))


def test_dense_greedy_generation_with_the_cache_equals_stock(stock, batch):
    checks.dense_greedy_generation_equals_stock(stock, batch, PAD)


def test_positions_are_the_stock_m_rope_positions(stock, batch):
    """Text after an image advances by the grid's longer side, not by its token count: an arange would be wrong."""
    backbone = backbone_for(stock.config)
    positions = backbone.prompt_positions(stock, batch["input_ids"], batch["attention_mask"],
                                          pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    expected, _ = stock.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"],
                                             attention_mask=batch["attention_mask"])
    assert torch.equal(positions, expected)
    last = batch["attention_mask"].shape[1] - 1
    assert int(positions[0, 0, last]) < int(batch["attention_mask"][0].sum()) - 1


# ---- VISOR's kinds on M-RoPE ---------------------------------------------------------------------------------------
def test_default_schedule_of_the_six_layer_model(sparse):
    checks.default_schedule_of_the_six_layer_model(sparse)


def test_mixed_batch_equals_each_sample_alone(sparse, batch):
    checks.mixed_batch_equals_each_sample_alone(sparse, batch, lambda row: _alone(batch, row))


def test_configurations_differ_and_the_image_reaches_the_text(sparse, batch):
    checks.configurations_differ_and_the_image_reaches_the_text(sparse, batch, IMAGE)


def test_a_text_token_reads_only_the_images_before_it(sparse, batch):
    """Changing sample 0's second image leaves every token before that image unchanged, in every configuration."""
    patches = batch["image_grid_thw"].prod(dim=-1)
    changed = batch["pixel_values"].clone()
    changed[int(patches[0]):int(patches[:2].sum())] += 1.0
    first_slot_of_second = int((batch["input_ids"][0] == IMAGE).nonzero()[backbone_for(sparse.config).image_tokens(
        IMAGES[0][0]).visual_tokens])
    checks.a_text_token_reads_only_the_images_before_it(sparse, batch, changed, first_slot_of_second)


def test_decoding_without_position_ids_equals_generate(sparse, batch):
    """After the prompt, positions continue from each sample's last M-RoPE position (kept in the cache), whatever
    kind the first layer is."""
    mixed = [0, 2, 1, 0]
    generated = sparse.generate(**batch, configuration=mixed, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        output = sparse(**batch, configuration=mixed, use_cache=True)
        cache, mask, tokens = output.past_key_values, batch["attention_mask"], []
        for _ in range(4):
            tokens.append(output.logits[:, -1].argmax(dim=-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
            output = sparse(input_ids=tokens[-1], attention_mask=mask, past_key_values=cache, use_cache=True)
    assert torch.equal(torch.cat(tokens, dim=1), generated[:, batch["input_ids"].shape[1]:])


def test_the_cache_holds_visual_entries_for_ca_and_the_sa_layers_used(sparse, batch):
    checks.the_cache_holds_visual_entries_for_ca_and_the_sa_layers_used(sparse, batch)


def test_auto_configuration_runs_what_the_router_chose(sparse, batch):
    with pytest.raises(ValueError, match="never trained"):
        sparse(**batch, configuration="auto")
    sparse.config.router_training = dict(note="random weights: this test checks what runs, not what is chosen")
    output = sparse(**batch, configuration="auto")
    sparse.config.router_training = None
    chosen = output.configuration.tolist()
    assert all(0 <= choice < len(sparse.config.configurations) for choice in chosen)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(output.logits[valid], checks.logits(sparse, batch, configuration=chosen)[valid],
                               atol=ATOL, rtol=0)


def _alone(batch, row: int) -> dict:
    """Sample `row` of `batch` unpadded, with only its own images."""
    real = batch["attention_mask"][row].bool()
    alone = dict(input_ids=batch["input_ids"][row][real][None], attention_mask=batch["attention_mask"][row][real][None])
    alone["mm_token_type_ids"] = (alone["input_ids"] == IMAGE).int()
    images = [index for index, owner in enumerate(_image_owners(batch)) if owner == row]
    return alone | (_images(batch, images) if images else {})


def test_a_cross_attention_block_started_from_its_host_attends_as_the_host(stock):
    """Its queries, keys and values are the host layer's (with Qwen3's per-head q/k norms), at the tokens' M-RoPE
    positions: ungated, it adds the host attention's output over the visual tokens."""
    model = family(stock.config).VISOR_MODEL.from_stock(stock, cross_attention_init="host",
                                                        cross_attention_gate=False).eval()
    host = model.text_stack.layers[0]
    block = model.cross_attention["0"]
    assert (block.k_norm is not None) == hasattr(host.self_attn, "k_norm")
    visual = torch.randn(2, 7, stock.config.text_config.hidden_size)
    rope = model.text_stack.rotary_emb(visual, torch.arange(7).expand(3, 2, 7))
    with torch.no_grad():
        keys, values = block.visual_keys_values(visual, rope)
        expected = head_states(host.self_attn, "k", host.input_layernorm(visual))
        expected_values = head_states(host.self_attn, "v", host.input_layernorm(visual))
    expected, _ = apply_rotary_pos_emb(expected, expected, *rope)
    torch.testing.assert_close(keys, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(values, expected_values, atol=ATOL, rtol=0)

    text = torch.randn(2, 5, stock.config.text_config.hidden_size)
    text_rope = model.text_stack.rotary_emb(text, torch.arange(7, 12).expand(3, 2, 5))
    attention = host.self_attn
    with torch.no_grad():
        query = head_states(attention, "q", host.input_layernorm(text))
        query, _ = apply_rotary_pos_emb(query, query, *text_rope)
        groups = attention.num_key_value_groups
        weights = (query @ expected.repeat_interleave(groups, 1).transpose(2, 3) * attention.scaling).softmax(-1)
        attended = (weights @ expected_values.repeat_interleave(groups, 1)).transpose(1, 2).reshape(2, 5, -1)
        added = block(text, keys, values, torch.ones(2, 5, 7, dtype=torch.bool), text_rope) - text
    torch.testing.assert_close(added, attention.o_proj(attended), atol=ATOL, rtol=0)


@torch.no_grad()
def test_deepstack_reaches_the_cross_attention_blocks_when_no_layer_runs_as_sa():
    """Qwen3-VL's additions after layers 0 and 1 go to the visual stream even where those layers run text-only
    (the CA-only configuration), so the CA block at layer 3 reads them."""
    stock = build_stock("tiny-qwen3-vl")
    batch = build_batch(stock)
    model = checks.sparse_of(stock)
    features = model.backbone.encode_images(model, 0, pixel_values=batch["pixel_values"],
                                            image_grid_thw=batch["image_grid_thw"])
    assert all(image.shape[0] == 3 for image in features)  # the features and two additions
    without = [torch.cat([image[:1], torch.zeros_like(image[1:])]) for image in features]
    valid = batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)
    first = checks.logits(model, batch, configuration=0)
    assert torch.equal(checks.logits(model, batch, configuration=0, image_features=features), first)
    assert (checks.logits(model, batch, configuration=0, image_features=without) - first)[valid].abs().max() > 1e-4


# ---- the in-LLM baselines ---------------------------------------------------------------------------------------
IN_LLM = {"fastv": lambda model: fastv(model, 2, 0.4), "pyramiddrop": lambda model: pyramiddrop(model, 0.5, [1, 3]),
          "sparsevlm": lambda model: sparsevlm(model, 0.4, [1, 3]), "shortv": lambda model: shortv(model, 0.5)}


@pytest.mark.parametrize("method", sorted(IN_LLM))
def test_in_llm_baselines_reduce_each_sample_as_alone(stock, batch, method):
    checks.in_llm_baseline_reduces_each_sample_as_alone(IN_LLM[method](stock), batch, lambda row: _alone(batch, row))


def test_in_llm_baselines_off_equal_stock_and_generate_with_the_cache(stock, batch):
    checks.in_llm_baselines_off_equal_stock_and_generate_with_the_cache(stock, batch, PAD)
    reduced = fastv(stock, 2, 0.3).generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert reduced.shape == (len(IMAGES), batch["input_ids"].shape[1] + 4)


def test_freezing_the_last_layer_changes_no_text_logit(stock, batch):
    """The `read` kind: text reads the visual keys and values the full layer would (q/k norms included)."""
    text = batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)
    torch.testing.assert_close(checks.logits(shortv(stock, layers=[5]), batch)[text], checks.logits(stock, batch)[text],
                               atol=ATOL, rtol=0)


def test_fastv_scores_are_the_stock_attention_row_of_the_last_token(stock, batch):
    checks.fastv_scores_are_the_stock_attention_row_of_the_last_token(stock, batch)


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_conversion_from_a_local_folder(stock, sparse, batch, tmp_path):
    checks.save_load_round_trip_and_conversion_from_a_local_folder(stock, sparse, batch, tmp_path)


# ---- the adapter ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 96), (30, 200), (500, 370), (2000, 1500)])
def test_image_tokens_follow_the_stock_processor(stock, size):
    from PIL import Image

    vision = stock.config.vision_config
    processor = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                         temporal_patch_size=vision.temporal_patch_size)
    grid = processor(Image.new("RGB", size[::-1]), return_tensors="pt")["image_grid_thw"][0]
    tokens = backbone_for(stock.config).image_tokens(size)
    assert tokens.visual_tokens == int(grid.prod()) // vision.spatial_merge_size**2 and tokens.crops == 1


def test_family_classes_and_parts(stock, sparse):
    module = family(stock.config)
    assert family(sparse.config) is module and isinstance(sparse, module.VISOR_MODEL)
    backbone = backbone_for(stock.config)
    assert backbone.language_model(stock) is stock.model.language_model
    assert backbone.vision_layers(stock) is stock.model.visual.blocks


# ---- bad input -------------------------------------------------------------------------------------------------------
def _image_owners(batch) -> list[int]:
    """The sample each image belongs to, in prompt order."""
    owners = []
    for row, ids in enumerate(batch["input_ids"]):
        starts = int((ids == START).sum())
        owners += [row] * starts
    return owners


def _images(batch, indices: list[int]) -> dict:
    grid = batch["image_grid_thw"]
    ends = torch.cat([torch.zeros(1, dtype=torch.long), grid.prod(dim=-1).cumsum(0)])
    pixels = torch.cat([batch["pixel_values"][ends[index]:ends[index + 1]] for index in indices])
    return dict(pixel_values=pixels, image_grid_thw=grid[indices])


def _drop_one_image_token(batch):
    input_ids = batch["input_ids"].clone()
    input_ids[0, int((input_ids[0] == IMAGE).nonzero()[0])] = FIRST_WORD_ID
    return dict(batch, input_ids=input_ids, mm_token_type_ids=(input_ids == IMAGE).int())


def _as_video(batch):
    grid = batch["image_grid_thw"].clone()
    grid[0, 0] = 2
    return dict(batch, image_grid_thw=grid)


BAD_INPUTS = {
    "missing-image-grid-thw": (lambda b: dict(b, image_grid_thw=None), "image_grid_thw is missing"),
    "missing-pixel-values": (lambda b: dict(b, pixel_values=None), "pixel_values are missing"),
    "wrong-token-count": (_drop_one_image_token, "image-token count does not match"),
    "grid-1d": (lambda b: dict(b, image_grid_thw=b["image_grid_thw"][:, 1]), r"image_grid_thw must be \(num_images, 3\)"),
    "video-grid": (_as_video, "video input is not supported"),
    "pixel-values-wrong-patches": (lambda b: dict(b, pixel_values=b["pixel_values"][1:]), "pixel_values must be"),
    "image-sizes": (lambda b: dict(b, image_sizes=torch.tensor([[64, 64]] * 4)), "take no image_sizes"),
    "pixel-values-videos": (lambda b: dict(b, pixel_values_videos=b["pixel_values"]), "take no pixel_values_videos"),
}


# What a family that reads video (Qwen2.5-VL, tests/backbones/test_video.py) says instead.
VIDEO_FAMILY_MESSAGES = {"video-grid": "videos go in pixel_values_videos with video_grid_thw",
                         "pixel-values-videos": "pixel_values_videos given, but input_ids hold no video tokens"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_value_error(sparse, batch, case):
    make, message = BAD_INPUTS[case]
    if sparse.backbone.video_inputs:
        message = VIDEO_FAMILY_MESSAGES.get(case, message)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        sparse(**make(batch))


def test_unsupported_variants_are_named():
    with pytest.raises(ValueError, match="no VISOR backbone for model type 'qwen3_vl_moe'"):
        backbone_for(AutoConfig.for_model("qwen3_vl_moe"))
    config = presets.tiny_qwen2_vl()
    config.text_config.use_sliding_window = True
    with pytest.raises(ValueError, match="sliding-window"):
        backbone_for(config)


@pytest.mark.parametrize("method", ["pool", "visionzip", "hired"])
def test_pre_llm_reductions_refuse_the_family_by_name(stock, method):
    from visor.reduction import apply_reduction, reduction_for

    with pytest.raises(ValueError, match=f"not ported to {type(backbone_for(stock.config)).__name__}"):
        reduction_for(stock.config, method, 2.0)
    with pytest.raises(ValueError, match="not ported"):
        apply_reduction(stock, method, 2.0)


def test_in_llm_baselines_match_a_flops_ratio_on_the_family(stock):
    """Matched on the reference prompt: the largest image the family's processor makes."""
    from visor.reduction import apply_reduction, prefill_flops
    from visor.reduction.budget import reference_inputs

    reference = reference_inputs(stock.config)
    assert int((reference["input_ids"] == IMAGE).sum()) == backbone_for(stock.config).image_tokens(
        backbone_for(stock.config).largest_image_size()).visual_tokens > 1000
    full = pruned(stock, PruningPlan({}, last_token_attention))
    for method in ("fastv", "pyramiddrop", "sparsevlm"):
        model = apply_reduction(stock, method, 2.0)
        ratio = float(prefill_flops(full, reference)[0] / prefill_flops(model, reference)[0])
        assert abs(ratio - 2.0) < 0.05, (method, ratio)


# ---- FLOPs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[(64, 96)], [(128, 64), (200, 330)], [(500, 370)]])
def test_vision_flops_equal_the_flop_counter_on_the_stock_vision_tower(stock, sizes):
    """Exact with eager attention: patch conv, blocks (windowed in Qwen2.5-VL but for its full-attention blocks),
    merger (and Qwen3-VL's DeepStack mergers)."""
    batch = build_batch(stock, images=[sizes])
    measured = checks.counted(lambda: stock.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]))
    assert measured == sum(vision_flops(stock.config, size).total for size in sizes)


def test_prefill_flops_of_every_configuration_equal_the_flop_counter(sparse):
    checks.prefill_flops_of_every_configuration_equal_the_flop_counter(
        sparse, build_batch(sparse, images=[IMAGES[0]]), IMAGE, IMAGES[0])


def test_a_nominal_image_has_exactly_its_tokens_in_a_near_square_grid(stock):
    backbone = backbone_for(stock.config)
    merge = stock.config.vision_config.spatial_merge_size
    assert [backbone.nominal_grid(tokens) for tokens in (729, 7290, 13, 1)] == [(27, 27), (81, 90), (1, 13), (1, 1)]
    assert nominal_vision_flops(stock.config, 64).parts == backbone.grid_flops(8 * merge, 8 * merge)
    assert backbone.nominal_image_inputs(7290)["image_grid_thw"].tolist() == [[1, 81 * merge, 90 * merge]]


@pytest.mark.parametrize("tokens", [13, 64])
def test_a_nominal_image_in_pixels_is_the_vision_work_counted(stock, tokens):
    """What `visor bench --end-to-end` times: the stock vision path on the nominal image, N tokens, its FLOPs."""
    backbone = backbone_for(stock.config)
    features = []
    measured = checks.counted(lambda: features.extend(backbone.encode_images(stock, tokens, **backbone.nominal_pixel_inputs(tokens))))
    assert measured == nominal_vision_flops(stock.config, tokens).total
    assert [image.shape[-2] for image in features] == [tokens]  # Qwen3-VL: (1 + DeepStack layers, N, d)
    assert backbone.nominal_visual_tokens(tokens) == tokens


def test_precomputed_features_with_their_grids_replace_the_images(sparse, batch):
    """Positions need the grids only: features computed once serve every configuration."""
    features = sparse.backbone.encode_images(sparse, 0, pixel_values=batch["pixel_values"],
                                             image_grid_thw=batch["image_grid_thw"])
    without_pixels = dict(batch, pixel_values=None)
    for configuration in range(3):
        assert torch.equal(checks.logits(sparse, without_pixels, configuration=configuration, image_features=features),
                           checks.logits(sparse, batch, configuration=configuration))
