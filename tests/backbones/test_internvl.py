"""InternVL3: dense VISOR equals the stock model (eager and SDPA, either padding side, with the cache), the layer
kinds on tiled images in mixed batches, checkpoints, the in-LLM baselines, the adapter's tile geometry against the
stock image processor, its FLOPs against FlopCounterMode, and clear errors for what the port refuses."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

import family_checks as checks
from visor import presets
from visor.backbones import backbone_for, family
from visor.backbones.internvl import InternVL
from visor.flops import nominal_vision_flops, vision_flops
from visor.reduction import fastv, pyramiddrop, shortv, sparsevlm
from visor.reduction.pruned import pruned_class

IMAGE = presets.TINY_IMAGE_TOKEN_ID
# `<img>` and `</img>` are text tokens around an image's tokens; any word ids do for the tiny model.
START, END = presets.TINY_VISION_START_TOKEN_ID, presets.TINY_VISION_END_TOKEN_ID
PAD, BOS, FIRST_WORD_ID = presets.TINY_PAD_TOKEN_ID, 1, 5
ATOL = checks.ATOL
PRESET = "tiny-internvl3"
# Image (height, width) per sample: two images of different tile counts, one, none (text only), and three.
IMAGES = [[(64, 96), (128, 64)], [(96, 96)], [], [(64, 64), (80, 112), (64, 64)]]


def build_stock(attention: str = "eager", num_layers: int = 6, seed: int = 0):
    config = presets.PRESETS[PRESET](num_layers)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return family(config).BACKBONE.stock_model_class(config).eval()


def _tiles(backbone, images) -> list[list[int]]:
    """Tiles of each image, per sample."""
    return [[backbone.tiles(size) for size in sample] for sample in images]


def build_batch(stock, images=IMAGES, padding: str = "left", seed: int = 1) -> dict[str, torch.Tensor]:
    """Prompts `[BOS, words…] (<img> <image>×n </img> words…)…`, n the tokens of the tiles the stock processor
    cuts each image size into (random pixels), padded on `padding`'s side."""
    backbone = backbone_for(stock.config)
    generator = torch.Generator().manual_seed(seed)
    vocab = stock.config.text_config.vocab_size

    def words(count):
        return torch.randint(FIRST_WORD_ID, vocab - 2, (count,), generator=generator).tolist()

    prompts = []
    for row, sample in enumerate(images):
        prompt = [BOS] + words(3)
        for size in sample:
            prompt += [START] + [IMAGE] * backbone.image_tokens(size).visual_tokens + [END] + words(2 + row)
        prompts.append(prompt + words(4))
    input_ids, attention_mask = checks.padded(prompts, padding, PAD)
    tiles = sum(map(sum, _tiles(backbone, images)))
    side = backbone.tile_side
    pixel_values = torch.randn(tiles, 3, side, side, generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


@pytest.fixture(scope="module")
def stock():
    return build_stock()


@pytest.fixture(scope="module")
def batch(stock):
    return build_batch(stock)


@pytest.fixture(scope="module")
def sparse(stock):
    return checks.sparse_of(stock)


def _alone(stock, batch, row: int) -> dict:
    """Sample `row` of `batch` unpadded, with only its own images' tiles."""
    real = batch["attention_mask"][row].bool()
    alone = dict(input_ids=batch["input_ids"][row][real][None], attention_mask=batch["attention_mask"][row][real][None])
    per_sample = [sum(tiles) for tiles in _tiles(backbone_for(stock.config), IMAGES)]
    start = sum(per_sample[:row])
    if per_sample[row]:
        alone["pixel_values"] = batch["pixel_values"][start:start + per_sample[row]]
    return alone


# ---- the oracle ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_dense_logits_and_loss_equal_stock(attention, padding):
    stock = build_stock(attention)
    checks.dense_logits_and_loss_equal_stock(stock, build_batch(stock, padding=padding), IMAGE, len(IMAGES))


def test_dense_greedy_generation_with_the_cache_equals_stock(stock, batch):
    checks.dense_greedy_generation_equals_stock(stock, batch, PAD)


def test_positions_are_one_per_token(stock, batch):
    positions = backbone_for(stock.config).prompt_positions(stock, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(positions, torch.arange(batch["input_ids"].shape[1]).expand(len(IMAGES), -1))


# ---- VISOR's kinds on tiled images ---------------------------------------------------------------------------------
def test_default_schedule_of_the_six_layer_model(sparse):
    checks.default_schedule_of_the_six_layer_model(sparse)


def test_mixed_batch_equals_each_sample_alone(stock, sparse, batch):
    checks.mixed_batch_equals_each_sample_alone(sparse, batch, lambda row: _alone(stock, batch, row))


def test_configurations_differ_and_the_image_reaches_the_text(sparse, batch):
    checks.configurations_differ_and_the_image_reaches_the_text(sparse, batch, IMAGE)


def test_a_text_token_reads_only_the_images_before_it(sparse, batch):
    """Changing sample 0's second image (its tiles) leaves every token before that image unchanged, in every
    configuration."""
    backbone = backbone_for(sparse.config)
    first_tiles, second_tiles = _tiles(backbone, IMAGES)[0]
    changed = batch["pixel_values"].clone()
    changed[first_tiles:first_tiles + second_tiles] += 1.0
    first_slot_of_second = int((batch["input_ids"][0] == IMAGE).nonzero()[backbone.image_tokens(
        IMAGES[0][0]).visual_tokens])
    checks.a_text_token_reads_only_the_images_before_it(sparse, batch, changed, first_slot_of_second)


def test_decoding_with_the_cache_equals_recomputation_and_generate(sparse, batch):
    """Each decoding step's logits with the cache are those of the whole sequence run again without it."""
    mixed = [0, 2, 1, 0]
    generated = sparse.generate(**batch, configuration=mixed, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        output = sparse(**batch, configuration=mixed, use_cache=True)
        cache, mask, tokens, steps = output.past_key_values, batch["attention_mask"], [], [output.logits[:, -1]]
        for _ in range(4):
            tokens.append(output.logits[:, -1].argmax(dim=-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
            output = sparse(input_ids=tokens[-1], attention_mask=mask, past_key_values=cache, use_cache=True)
            steps.append(output.logits[:, -1])
    assert torch.equal(torch.cat(tokens, dim=1), generated[:, batch["input_ids"].shape[1]:])
    whole = checks.logits(sparse, dict(batch, input_ids=torch.cat([batch["input_ids"], *tokens], dim=1), attention_mask=mask),
                   configuration=mixed)
    torch.testing.assert_close(torch.stack(steps, dim=1), whole[:, -5:], atol=ATOL, rtol=0)


def test_the_cache_holds_visual_entries_for_ca_and_the_sa_layers_used(sparse, batch):
    checks.the_cache_holds_visual_entries_for_ca_and_the_sa_layers_used(sparse, batch)


def test_precomputed_features_replace_the_images(sparse, batch):
    features = sparse.backbone.encode_images(sparse, 0, pixel_values=batch["pixel_values"])
    tokens = sparse.backbone.tokens_per_tile()
    assert [tuple(tile.shape) for tile in features] == [(tokens, 128)] * len(batch["pixel_values"])
    for configuration in range(3):
        assert torch.equal(checks.logits(sparse, dict(batch, pixel_values=None), configuration=configuration,
                                  image_features=features), checks.logits(sparse, batch, configuration=configuration))


# ---- the in-LLM baselines ---------------------------------------------------------------------------------------
IN_LLM = {"fastv": lambda model: fastv(model, 2, 0.4), "pyramiddrop": lambda model: pyramiddrop(model, 0.5, [1, 3]),
          "sparsevlm": lambda model: sparsevlm(model, 0.4, [1, 3]), "shortv": lambda model: shortv(model, 0.5)}


@pytest.mark.parametrize("method", sorted(IN_LLM))
def test_in_llm_baselines_reduce_each_sample_as_alone(stock, batch, method):
    model = IN_LLM[method](stock)
    assert isinstance(model, pruned_class(InternVL))
    checks.in_llm_baseline_reduces_each_sample_as_alone(model, batch, lambda row: _alone(stock, batch, row))


def test_in_llm_baselines_off_equal_stock_and_generate_with_the_cache(stock, batch):
    checks.in_llm_baselines_off_equal_stock_and_generate_with_the_cache(stock, batch, PAD)


def test_fastv_scores_are_the_stock_attention_row_of_the_last_token(stock, batch):
    checks.fastv_scores_are_the_stock_attention_row_of_the_last_token(stock, batch)


@pytest.mark.parametrize("method", ["pool", "visionzip", "hired"])
def test_pre_llm_reductions_refuse_the_family_by_name(stock, method):
    from visor.reduction import apply_reduction, reduction_for

    with pytest.raises(ValueError, match="not ported to InternVL models"):
        reduction_for(stock.config, method, 2.0)
    with pytest.raises(ValueError, match="not ported"):
        apply_reduction(stock, method, 2.0)


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_conversion_from_a_local_folder(stock, sparse, batch, tmp_path):
    checks.save_load_round_trip_and_conversion_from_a_local_folder(stock, sparse, batch, tmp_path)
    assert sparse.config.model_type == "visor_internvl"


# ---- the adapter ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (30, 200), (500, 370), (2000, 1500), (90, 3000)])
def test_image_tokens_follow_the_stock_image_processor(stock, size):
    backbone = backbone_for(stock.config)
    processor = backbone.default_image_processor()
    pixels = processor(Image.new("RGB", size[::-1]), return_tensors="pt")["pixel_values"]
    tokens = backbone.image_tokens(size)
    assert tokens.crops == len(pixels) == processor.get_number_of_image_patches(*size)
    assert tokens.visual_tokens == len(pixels) * 16
    assert tuple(pixels.shape[1:]) == (3, 64, 64)


def test_the_largest_image_is_cut_into_the_most_tiles(stock):
    backbone = backbone_for(stock.config)
    largest = backbone.largest_image_size()
    assert largest == (4 * 64, 3 * 64)
    assert backbone.tiles(largest) == GotOcr2ImageProcessorPil.max_patches + 1


def test_family_classes_and_parts(stock, sparse):
    module = family(stock.config)
    assert family(sparse.config) is module and isinstance(sparse, module.VISOR_MODEL)
    backbone = backbone_for(stock.config)
    assert isinstance(backbone, InternVL) and isinstance(backbone_for(sparse.config), InternVL)
    assert backbone.language_model(stock) is stock.model.language_model
    assert backbone.vision_layers(stock) is stock.model.vision_tower.encoder.layer
    assert backbone.feature_layer() == stock.config.vision_config.num_hidden_layers - 1


# ---- FLOPs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[(64, 96)], [(128, 64), (200, 330)], [(500, 370)]])
def test_vision_flops_equal_the_flop_counter_on_the_stock_vision_tower(stock, sizes):
    """Exact with eager attention: patch conv, every InternViT layer over the patches and the CLS token, projector."""
    batch = build_batch(stock, images=[sizes])
    measured = checks.counted(lambda: stock.model.get_image_features(batch["pixel_values"]))
    assert measured == sum(vision_flops(stock.config, size).total for size in sizes)


def test_prefill_flops_of_every_configuration_equal_the_flop_counter(sparse):
    checks.prefill_flops_of_every_configuration_equal_the_flop_counter(
        sparse, build_batch(sparse, images=[IMAGES[0]]), IMAGE, IMAGES[0])


def test_the_internvl3_1b_preset_counts_its_vision_side_as_the_flop_counter_does():
    """The released shapes (`visor bench --preset internvl3-1b`), on the meta device: 256 tokens per 448-pixel tile,
    and the vision FLOPs of a 2×2-tile image (4 tiles and the thumbnail) are what FlopCounterMode counts."""
    from visor.bench import BenchPlan

    config = presets.PRESETS["internvl3-1b"]()
    config._attn_implementation = "eager"
    assert BenchPlan("internvl3-1b").config.model_type == "visor_internvl"
    backbone = backbone_for(config)
    assert backbone.tokens_per_tile() == 256 and backbone.image_tokens((896, 896)) == (5, 5 * 256)
    with torch.device("meta"):
        model = family(config).BACKBONE.stock_model_class(config).eval()
    measured = checks.counted(lambda: model.model.get_image_features(torch.empty(5, 3, 448, 448, device="meta")))
    assert measured == vision_flops(config, (896, 896)).total


@pytest.mark.parametrize("tokens", [16, 40, 16 * 13])
def test_a_nominal_image_in_pixels_is_the_vision_work_counted(stock, tokens):
    """What `visor bench --end-to-end` times: ceil(N / tokens per tile) tiles through the stock vision path."""
    backbone = backbone_for(stock.config)
    features = []
    measured = checks.counted(lambda: features.extend(backbone.encode_images(stock, tokens,
                                                                       **backbone.nominal_pixel_inputs(tokens))))
    assert measured == nominal_vision_flops(stock.config, tokens).total
    assert sum(tile.shape[0] for tile in features) == backbone.nominal_visual_tokens(tokens) == -(-tokens // 16) * 16


def test_a_nominal_image_of_a_tile_count_no_image_has_is_refused(stock):
    backbone = backbone_for(stock.config)
    with pytest.raises(ValueError, match="no image is cut into exactly 2 tiles .* 1 or 3 to 13 tiles"):
        backbone.nominal_pixel_inputs(32)
    with pytest.raises(ValueError, match="exactly 14 tiles"):
        backbone.nominal_pixel_inputs(14 * 16)


# ---- bad input -------------------------------------------------------------------------------------------------------
def _drop_one_image_token(batch):
    input_ids = batch["input_ids"].clone()
    input_ids[0, int((input_ids[0] == IMAGE).nonzero()[0])] = FIRST_WORD_ID
    return dict(batch, input_ids=input_ids)


BAD_INPUTS = {
    "missing-pixel-values": (lambda b: dict(b, pixel_values=None), "pixel_values are missing"),
    "wrong-token-count": (_drop_one_image_token, "image-token count does not match"),
    "one-tile-too-few": (lambda b: dict(b, pixel_values=b["pixel_values"][1:]), "image-token count does not match"),
    "pixel-values-5d": (lambda b: dict(b, pixel_values=b["pixel_values"][None]),
                        r"pixel_values must be \(tiles, 3, 64, 64\)"),
    "other-tile-size": (lambda b: dict(b, pixel_values=b["pixel_values"][..., :32, :32]), "pixel_values must be"),
    "image-sizes": (lambda b: dict(b, image_sizes=torch.tensor([[64, 64]] * 4)), "take no image_sizes"),
    "image-grid-thw": (lambda b: dict(b, image_grid_thw=torch.tensor([[1, 8, 8]])), "take no image_grid_thw"),
    "pixel-values-videos": (lambda b: dict(b, pixel_values_videos=b["pixel_values"]), "take no pixel_values_videos"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_value_error(sparse, batch, case):
    make, message = BAD_INPUTS[case]
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        sparse(**make(batch))


def test_features_with_the_cls_token_are_refused():
    config = presets.tiny_internvl3()
    config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="drop the vision tower's CLS token"):
        backbone_for(config)
