"""InternVL3: dense VISOR equals the stock model (eager and SDPA, either padding side, with the cache), the layer
kinds on tiled images in mixed batches, checkpoints, the in-LLM baselines, the adapter's tile geometry against the
stock image processor, its FLOPs against FlopCounterMode, and clear errors for what the port refuses."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from visor import presets
from visor.backbones import backbone_for, family
from visor.backbones.internvl import InternVL, VisorInternVLForConditionalGeneration
from visor.config import Schedule
from visor.flops import llm_prefill_flops, nominal_vision_flops, vision_flops
from visor.reduction import fastv, pyramiddrop, shortv, sparsevlm
from visor.reduction.pruned import PruningPlan, pruned, pruned_class
from visor.reduction.fastv import last_token_attention

IMAGE = presets.TINY_IMAGE_TOKEN_ID
# `<img>` and `</img>` are text tokens around an image's tokens; any word ids do for the tiny model.
START, END = presets.TINY_VISION_START_TOKEN_ID, presets.TINY_VISION_END_TOKEN_ID
PAD, BOS, FIRST_WORD_ID = presets.TINY_PAD_TOKEN_ID, 1, 5
ATOL = 1e-5
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
    length = max(map(len, prompts))
    input_ids = torch.full((len(prompts), length), PAD)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        place = slice(length - len(prompt), None) if padding == "left" else slice(0, len(prompt))
        input_ids[row, place], attention_mask[row, place] = torch.tensor(prompt), 1
    tiles = sum(map(sum, _tiles(backbone, images)))
    side = backbone.tile_side
    pixel_values = torch.randn(tiles, 3, side, side, generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


def dense_of(stock):
    module = family(stock.config)
    return module.VISOR_MODEL.from_stock(stock, module.VISOR_MODEL.config_class.dense(stock.config)).eval()


def sparse_of(stock, seed: int = 5):
    """The default schedule with open CA gates and a random CPE, so that the new modules change the output."""
    model = family(stock.config).VISOR_MODEL.from_stock(stock).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.attention_gate.fill_(0.7)
        weight = model.position_encoding.conv.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


@torch.no_grad()
def logits(model, batch, **kwargs) -> torch.Tensor:
    return model(**batch, **kwargs).logits


@pytest.fixture(scope="module")
def stock():
    return build_stock()


@pytest.fixture(scope="module")
def batch(stock):
    return build_batch(stock)


@pytest.fixture(scope="module")
def sparse(stock):
    return sparse_of(stock)


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
    batch = build_batch(stock, padding=padding)
    valid = batch["attention_mask"].bool()
    assert not valid.all() and len(set((batch["input_ids"] == IMAGE).sum(dim=1).tolist())) == len(IMAGES)
    dense = dense_of(stock)
    torch.testing.assert_close(logits(dense, batch)[valid], logits(stock, batch)[valid], atol=ATOL, rtol=0)
    # A target whose prediction is made at a padding position (the first real token, left-padded) is no target.
    first_real = batch["attention_mask"].cumsum(dim=1) == 1
    labels = batch["input_ids"].masked_fill(~valid | first_real | (batch["input_ids"] == IMAGE), -100)
    with torch.no_grad():
        expected, actual = stock(**batch, labels=labels).loss, dense(**batch, labels=labels).loss
    assert torch.isfinite(expected)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_dense_greedy_generation_with_the_cache_equals_stock(stock, batch):
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    expected = stock.generate(**batch, **options)
    actual = dense_of(stock).generate(**batch, **options)
    new = actual[:, batch["input_ids"].shape[1]:]
    assert new.shape[1] == 6 and len(new.unique()) > 2
    assert torch.equal(actual, expected)


def test_positions_are_one_per_token(stock, batch):
    positions = backbone_for(stock.config).prompt_positions(stock, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(positions, torch.arange(batch["input_ids"].shape[1]).expand(len(IMAGES), -1))


# ---- VISOR's kinds on tiled images ---------------------------------------------------------------------------------
def test_default_schedule_of_the_six_layer_model(sparse):
    assert sparse.config.cross_attention_layers == [0, 3]
    assert sparse.config.configurations == [[], [1], [1, 4]]


def test_mixed_batch_equals_each_sample_alone(stock, sparse, batch):
    mixed = [2, 0, 1, 2]
    together = logits(sparse, batch, configuration=mixed)
    valid = batch["attention_mask"].bool()
    for row, configuration in enumerate(mixed):
        expected = logits(sparse, _alone(stock, batch, row), configuration=configuration)[0]
        torch.testing.assert_close(together[row][valid[row]], expected, atol=ATOL, rtol=0)


def test_configurations_differ_and_the_image_reaches_the_text(sparse, batch):
    outputs = [logits(sparse, batch, configuration=configuration) for configuration in range(3)]
    other = logits(sparse, dict(batch, pixel_values=batch["pixel_values"] + 1.0), configuration=0)
    valid = batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE)
    for first, second in ((outputs[0], outputs[1]), (outputs[1], outputs[2]), (outputs[0], other)):
        assert (first - second)[valid].abs().max() > 1e-3


def test_a_text_token_reads_only_the_images_before_it(sparse, batch):
    """Changing sample 0's second image (its tiles) leaves every token before that image unchanged, in every
    configuration."""
    backbone = backbone_for(sparse.config)
    first_tiles, second_tiles = _tiles(backbone, IMAGES)[0]
    changed = batch["pixel_values"].clone()
    changed[first_tiles:first_tiles + second_tiles] += 1.0
    first_slot_of_second = int((batch["input_ids"][0] == IMAGE).nonzero()[backbone.image_tokens(
        IMAGES[0][0]).visual_tokens])
    for configuration in range(3):
        first = logits(sparse, batch, configuration=configuration)[0]
        second = logits(sparse, dict(batch, pixel_values=changed), configuration=configuration)[0]
        assert torch.equal(first[:first_slot_of_second], second[:first_slot_of_second])
        assert (first[-1] - second[-1]).abs().max() > 1e-4


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
    whole = logits(sparse, dict(batch, input_ids=torch.cat([batch["input_ids"], *tokens], dim=1), attention_mask=mask),
                   configuration=mixed)
    torch.testing.assert_close(torch.stack(steps, dim=1), whole[:, -5:], atol=ATOL, rtol=0)


def test_the_cache_holds_visual_entries_for_ca_and_the_sa_layers_used(sparse, batch):
    for configuration, sa_layers in enumerate(sparse.config.configurations):
        cache = sparse(**batch, configuration=configuration, use_cache=True).past_key_values
        assert sorted(cache.cross_keys) == sparse.config.cross_attention_layers
        assert sorted(cache.visual_keys) == sorted(sa_layers)


def test_precomputed_features_replace_the_images(sparse, batch):
    features = sparse.backbone.encode_images(sparse, 0, pixel_values=batch["pixel_values"])
    tokens = sparse.backbone.tokens_per_tile()
    assert [tuple(tile.shape) for tile in features] == [(tokens, 128)] * len(batch["pixel_values"])
    for configuration in range(3):
        assert torch.equal(logits(sparse, dict(batch, pixel_values=None), configuration=configuration,
                                  image_features=features), logits(sparse, batch, configuration=configuration))


# ---- the in-LLM baselines ---------------------------------------------------------------------------------------
IN_LLM = {"fastv": lambda model: fastv(model, 2, 0.4), "pyramiddrop": lambda model: pyramiddrop(model, 0.5, [1, 3]),
          "sparsevlm": lambda model: sparsevlm(model, 0.4, [1, 3]), "shortv": lambda model: shortv(model, 0.5)}


@pytest.mark.parametrize("method", sorted(IN_LLM))
def test_in_llm_baselines_reduce_each_sample_as_alone(stock, batch, method):
    model = IN_LLM[method](stock)
    assert isinstance(model, pruned_class(InternVL))
    together = logits(model, batch, logits_to_keep=1)
    for row in range(len(batch["input_ids"])):
        torch.testing.assert_close(logits(model, _alone(stock, batch, row), logits_to_keep=1)[0], together[row],
                                   atol=ATOL, rtol=0)


def test_in_llm_baselines_off_equal_stock_and_generate_with_the_cache(stock, batch):
    valid = batch["attention_mask"].bool()
    expected = logits(stock, batch)
    for model in (fastv(stock, 2, 1.0), sparsevlm(stock, 1.0, [1, 3]), shortv(stock, 0.0)):
        torch.testing.assert_close(logits(model, batch)[valid], expected[valid], atol=ATOL, rtol=0)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert torch.equal(fastv(stock, 2, 1.0).generate(**batch, **options), stock.generate(**batch, **options))


@torch.no_grad()
def test_fastv_scores_are_the_stock_attention_row_of_the_last_token(stock, batch):
    recorded = []

    def recording(*args):
        recorded.append(last_token_attention(*args))
        return recorded[-1]

    pruned(stock, PruningPlan({2: 0.5}, recording))(**batch, logits_to_keep=1)
    attentions = stock(**batch, output_attentions=True).attentions[1]
    torch.testing.assert_close(recorded[0], attentions[:, :, -1].mean(dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["pool", "visionzip", "hired"])
def test_pre_llm_reductions_refuse_the_family_by_name(stock, method):
    from visor.reduction import apply_reduction, reduction_for

    with pytest.raises(ValueError, match="not ported to InternVL models"):
        reduction_for(stock.config, method, 2.0)
    with pytest.raises(ValueError, match="not ported"):
        apply_reduction(stock, method, 2.0)


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_conversion_from_a_local_folder(stock, sparse, batch, tmp_path):
    sparse.save_pretrained(tmp_path / "visor")
    assert AutoConfig.from_pretrained(tmp_path / "visor").model_type == "visor_internvl"
    loaded = VisorInternVLForConditionalGeneration.from_pretrained(tmp_path / "visor", attn_implementation="eager")
    assert torch.equal(logits(loaded.eval(), batch, configuration=[0, 1, 2, 0]),
                       logits(sparse, batch, configuration=[0, 1, 2, 0]))
    stock.save_pretrained(tmp_path / "stock")
    dense = VisorInternVLForConditionalGeneration.from_stock(
        tmp_path / "stock", VisorInternVLForConditionalGeneration.config_class.dense(stock.config))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits(dense.eval(), batch)[valid], logits(stock, batch)[valid], atol=ATOL, rtol=0)


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
def _counted(run) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("sizes", [[(64, 96)], [(128, 64), (200, 330)], [(500, 370)]])
def test_vision_flops_equal_the_flop_counter_on_the_stock_vision_tower(stock, sizes):
    """Exact with eager attention: patch conv, every InternViT layer over the patches and the CLS token, projector."""
    batch = build_batch(stock, images=[sizes])
    measured = _counted(lambda: stock.model.get_image_features(batch["pixel_values"]))
    assert measured == sum(vision_flops(stock.config, size).total for size in sizes)


def test_prefill_flops_of_every_configuration_equal_the_flop_counter(sparse):
    """One prompt with two images: the vision side per image plus the LLM count of the prompt's tokens."""
    batch = build_batch(sparse, images=[IMAGES[0]])
    visual = int((batch["input_ids"] == IMAGE).sum())
    text = batch["input_ids"].shape[1] - visual
    vision = sum(vision_flops(sparse.config, size).total for size in IMAGES[0])
    for configuration in range(len(sparse.config.configurations)):
        measured = _counted(lambda: sparse(**batch, configuration=configuration, logits_to_keep=1))
        schedule = Schedule.of(sparse.config, configuration)
        assert measured == vision + llm_prefill_flops(sparse.config, visual, text, schedule).total


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
    measured = _counted(lambda: model.model.get_image_features(torch.empty(5, 3, 448, 448, device="meta")))
    assert measured == vision_flops(config, (896, 896)).total


@pytest.mark.parametrize("tokens", [16, 40, 16 * 13])
def test_a_nominal_image_in_pixels_is_the_vision_work_counted(stock, tokens):
    """What `visor bench --end-to-end` times: ceil(N / tokens per tile) tiles through the stock vision path."""
    backbone = backbone_for(stock.config)
    features = []
    measured = _counted(lambda: features.extend(backbone.encode_images(stock, tokens,
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
