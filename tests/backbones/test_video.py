"""Video through VISOR (LLaVA-OneVision): the video token's slots are visual tokens like any image's.

The dense oracle on video-only and mixed image + video batches (left and right padding, eager and SDPA, Qwen2 and
Llama text), the sparse configurations on video prompts, cached decoding, generation, and the families that still
refuse video.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

import family_checks as checks
from visor import presets
from visor.backbones import backbone_for

IMAGE, VIDEO, PAD, BOS = presets.TINY_IMAGE_TOKEN_ID, presets.TINY_VIDEO_TOKEN_ID, presets.TINY_PAD_TOKEN_ID, 1
FRAMES = 3
IMAGE_SIZE = (64, 128)  # 3 anyres crops
ATOL = 1e-5

# Each row's parts in prompt order: a number of random words, an image or a video.
VIDEO_ONLY = [[3, "video", 4], [2, "video", 9], [5, "video", 1]]
MIXED = [[2, "image", 2, "video", 3], [3, "video", 2, "image", 2], [4, "video", 5], [2, "image", 6]]


def build_stock(preset="tiny", attention="eager", num_layers=4, seed=0):
    config = presets.PRESETS[preset](num_layers)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval()


@torch.no_grad()
def logits(model, batch, **kwargs):
    return model(**batch, **kwargs).logits


@pytest.fixture(scope="module")
def stock():
    return build_stock(num_layers=6)


@pytest.fixture(scope="module")
def sparse(stock):
    """The default schedule of six layers (CA [0, 3], configurations [[], [1], [1, 4]]), gates open, a random CPE."""
    return checks.sparse_of(stock, seed=3)


@pytest.fixture(scope="module")
def video_batch(video_batch_factory):
    return functools.partial(video_batch_factory, frames=FRAMES, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def mixed(stock, video_batch):
    return video_batch(stock, MIXED)


# ---- the geometry --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 2, 5])
def test_video_token_count_is_the_stock_model_s(stock, frames):
    """Each frame's 8x8 patch grid pooled to 4x4, then one newline per video, as the stock model's features."""
    backbone = backbone_for(stock.config)
    pixels = torch.randn(2, frames, 3, presets.TINY_CROP, presets.TINY_CROP)
    with torch.no_grad():
        features = stock.model.get_video_features(pixels, return_dict=True).pooler_output
        ours = backbone.encode_videos(stock, 0, pixel_values_videos=pixels)
    assert backbone.frame_tokens() == 16
    assert backbone.video_tokens(frames) == (frames, features.shape[1]) == (frames, frames * 16 + 1)
    assert len(ours) == 2 and all(torch.equal(video, expected) for video, expected in zip(ours, features))


def test_video_geometry_refuses_what_the_stock_pooling_cannot_take(stock):
    backbone = backbone_for(stock.config)
    with pytest.raises(ValueError, match="at least one frame"):
        backbone.video_tokens(0)
    config = presets.tiny(2)
    config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="video needs vision_feature_select_strategy='full'"):
        backbone_for(config).video_tokens(4)


# ---- the dense oracle ----------------------------------------------------------------------------------------------
ORACLE_CASES = [(preset, attention) for preset in ("tiny", "tiny-llama") for attention in ("eager", "sdpa")]


@pytest.fixture(scope="module", params=ORACLE_CASES, ids=lambda case: "-".join(case))
def oracle(request):
    stock = build_stock(*request.param)
    return stock, checks.dense_of(stock)


@pytest.mark.parametrize("rows", [VIDEO_ONLY, MIXED], ids=["video-only", "image-and-video"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_dense_logits_equal_stock_on_video_prompts(oracle, video_batch, rows, padding):
    stock, dense = oracle
    batch, _ = video_batch(stock, rows, padding)
    valid = batch["attention_mask"].bool()
    assert (~valid).any() and (batch["input_ids"] == VIDEO).any()
    torch.testing.assert_close(logits(dense, batch)[valid], logits(stock, batch)[valid], atol=ATOL, rtol=0)


def test_dense_loss_equals_stock_on_a_mixed_batch(oracle, video_batch):
    stock, dense = oracle
    batch, _ = video_batch(stock, MIXED, "right")
    visual = (batch["input_ids"] == IMAGE) | (batch["input_ids"] == VIDEO)
    labels = batch["input_ids"].masked_fill(visual | (batch["attention_mask"] == 0), -100)
    with torch.no_grad():
        expected, actual = stock(**batch, labels=labels).loss, dense(**batch, labels=labels).loss
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_dense_generation_equals_stock_on_video_prompts(stock, mixed):
    batch, _ = mixed
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    expected = stock.generate(**batch, **options)
    dense = checks.dense_of(stock)
    assert torch.equal(dense.generate(**batch, **options), expected)
    assert torch.equal(dense.generate(**batch, use_cache=False, **options), expected)


# ---- the sparse model reads video tokens as it reads image tokens --------------------------------------------------
def as_image_features(model, batch, kinds):
    """The batch with every video's tokens relabelled as image tokens, and `image_features` holding each row's
    images and videos in prompt order (the videos' from the stock video path)."""
    backbone = model.backbone
    with torch.no_grad():
        images = list(backbone.encode_images(model, 0, pixel_values=batch["pixel_values"],
                                             image_sizes=batch["image_sizes"]))
        videos = backbone.encode_videos(model, 0, pixel_values_videos=batch["pixel_values_videos"])
    features = [(images if kind == "image" else videos).pop(0) for row in kinds for kind in row]
    input_ids = batch["input_ids"].masked_fill(batch["input_ids"] == VIDEO, IMAGE)
    return dict(input_ids=input_ids, attention_mask=batch["attention_mask"], image_features=features)


@pytest.mark.parametrize("configuration", [0, 1, 2, [0, 2, 1, 2]])
def test_video_tokens_run_exactly_as_image_tokens(sparse, mixed, configuration):
    """CA blocks, SA layers, the CPE and the router read a video's tokens as they read an image's: the same
    features in image slots give the same logits, in CA-only and SA configurations alike."""
    batch, kinds = mixed
    relabelled = as_image_features(sparse, batch, kinds)
    valid = batch["attention_mask"].bool()
    expected = logits(sparse, relabelled, configuration=configuration)
    torch.testing.assert_close(logits(sparse, batch, configuration=configuration)[valid], expected[valid],
                               atol=1e-6, rtol=0)


def test_precomputed_video_features_replace_the_pixels(sparse, mixed):
    """`video_features` (what `encode_videos` returns) instead of `pixel_values_videos` give the same logits in every
    configuration: what `visor bench --video-frames` times the language model on."""
    batch, _ = mixed
    with torch.no_grad():
        features = backbone_for(sparse.config).encode_videos(sparse, 0, pixel_values_videos=batch["pixel_values_videos"])
    precomputed = dict(batch, pixel_values_videos=None, video_features=features)
    valid = batch["attention_mask"].bool()
    for configuration in range(len(sparse.config.configurations)):
        torch.testing.assert_close(logits(sparse, precomputed, configuration=configuration)[valid],
                                   logits(sparse, batch, configuration=configuration)[valid], atol=1e-6, rtol=0)


def test_every_configuration_reads_the_video(sparse, stock, video_batch):
    """Guard for the test above: another video changes the logits of every configuration, CA-only included."""
    batch, _ = video_batch(stock, VIDEO_ONLY)
    other = dict(batch, pixel_values_videos=torch.randn_like(batch["pixel_values_videos"]))
    last = batch["attention_mask"].bool() & (batch["input_ids"] != VIDEO)
    for configuration in range(len(sparse.config.configurations)):
        change = logits(sparse, batch, configuration=configuration) - logits(sparse, other,
                                                                             configuration=configuration)
        assert change[last].abs().max() > 1e-3, configuration


def test_the_cache_keeps_video_keys_only_where_an_image_s_would_be(sparse, mixed):
    batch, _ = mixed
    config = sparse.config
    visual = ((batch["input_ids"] == IMAGE) | (batch["input_ids"] == VIDEO)).sum(dim=1)
    for configuration, used in enumerate(config.configurations):
        with torch.no_grad():
            cache = sparse(**batch, configuration=configuration, use_cache=True, logits_to_keep=1).past_key_values
        assert sorted(cache.visual_keys) == sorted(used)
        assert sorted(cache.cross_keys) == sorted(config.cross_attention_layers)
        assert cache.visual_valid.sum(dim=1).tolist() == visual.tolist()


@torch.no_grad()
def recompute_greedy(model, batch, configuration, steps=5):
    """Greedy decoding by re-running the whole prompt and the tokens so far at every step, no cache."""
    batch = dict(batch)
    for _ in range(steps):
        step = model(**batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
                     configuration=configuration).logits
        next_ids = step[:, -1].argmax(-1, keepdim=True)
        batch["input_ids"] = torch.cat([batch["input_ids"], next_ids], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], dim=1)
    return batch["input_ids"]


@pytest.mark.parametrize("configuration", [0, 2, [0, 2, 1, 2]])
def test_cached_decoding_of_video_prompts_equals_recomputation(sparse, mixed, configuration):
    batch, _ = mixed
    cached = sparse.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=PAD,
                             configuration=configuration)
    assert torch.equal(cached, recompute_greedy(sparse, batch, configuration))


# ---- in-LLM pruning ranks video tokens as visual tokens ------------------------------------------------------------
def test_pruning_keeps_its_share_of_video_tokens(stock, mixed):
    """The no-drop plan is the stock model on video prompts; FastV keeps its fraction of image + video tokens."""
    from visor.reduction.fastv import fastv
    from visor.reduction.pruned import PruningPlan, kept_count, pruned
    from visor.reduction.sparsevlm import question_counts

    batch, _ = mixed
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(logits(pruned(stock, PruningPlan({})), batch)[valid], logits(stock, batch)[valid],
                               atol=ATOL, rtol=0)
    with torch.no_grad():
        cache = fastv(stock, 2, 0.5)(**batch, use_cache=True, logits_to_keep=1).past_key_values
    visual = ((batch["input_ids"] == IMAGE) | (batch["input_ids"] == VIDEO)) & valid
    text = (valid & ~visual).sum(dim=1)
    assert torch.equal(cache.valid[1].sum(dim=1), text + visual.sum(dim=1))
    assert torch.equal(cache.valid[2].sum(dim=1), text + kept_count(visual.sum(dim=1), 0.5))
    # SparseVLM's raters (the score rows the counter prices) are the text after the last image or video.
    order = torch.arange(visual.shape[1]).expand_as(visual)
    last_visual = torch.where(visual, order, -1).max(dim=1).values
    raters = (valid & ~visual & (order > last_visual[:, None])).sum(dim=1)
    assert torch.equal(question_counts(stock.config, batch), raters) and bool((raters < text).all())


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_video_inputs_are_named(sparse, stock, video_batch):
    batch, _ = video_batch(stock, VIDEO_ONLY)
    pixels = batch["pixel_values_videos"]
    features = [torch.zeros(int((row == VIDEO).sum()), stock.config.text_config.hidden_size) for row in batch["input_ids"]]
    no_video_ids = batch["input_ids"].masked_fill(batch["input_ids"] == VIDEO, 7)
    cases = [
        (dict(batch, pixel_values_videos=None), "video tokens but pixel_values_videos are missing"),
        (dict(batch, pixel_values_videos=pixels[:, :, :, :32]), r"must be \(videos, frames, 3, 64, 64\)"),
        (dict(batch, pixel_values_videos=pixels[:2]), "video-token count does not match the videos"),
        (dict(batch, pixel_values_videos=pixels.clone().fill_(float("nan"))), "pixel_values_videos hold NaN"),
        (dict(batch, input_ids=no_video_ids), "pixel_values_videos given, but input_ids hold no video tokens"),
        (dict(batch, pixel_values_videos=None, video_features=features[:2]), "video-token count does not match"),
        (dict(batch, pixel_values_videos=None, video_features=[torch.full_like(video, float("nan")) for video in features]),
         "video_features hold NaN"),
        (dict(batch, input_ids=no_video_ids, pixel_values_videos=None, video_features=features),
         "video_features given, but input_ids hold no video tokens"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            sparse(**inputs)
    with torch.no_grad():
        cache = sparse(**batch, use_cache=True, logits_to_keep=1).past_key_values
    with pytest.raises(ValueError, match="images and videos go in the first"):
        sparse(input_ids=torch.full((3, 1), VIDEO), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-internvl3"])
def test_families_without_video_refuse_it_by_name(preset):
    backbone = backbone_for(presets.PRESETS[preset](2))
    assert backbone.video_inputs == ()
    for name in ("pixel_values_videos", "video_grid_thw"):
        with pytest.raises(ValueError, match=f"take no {name}"):
            backbone.select_image_inputs(pixel_values=None, **{name: torch.ones(1, 3)})
    ids = torch.tensor([[IMAGE, VIDEO, 7]])
    assert backbone.visual_token_mask(ids).tolist() == [[True, False, False]]


# ---- Qwen2.5-VL: video patches, temporal M-RoPE -----------------------------------------------------------------
QWEN_START, QWEN_END = presets.TINY_VISION_START_TOKEN_ID, presets.TINY_VISION_END_TOKEN_ID
# Each row's parts: words, an image of (height, width), or a video of (frames, height, width).
QWEN_VIDEO_ONLY = [[3, ("video", (4, 64, 64)), 4], [2, ("video", (2, 32, 64)), 7], [5, ("video", (6, 32, 32)), 1]]
QWEN_MIXED = [[2, ("image", (64, 96)), 2, ("video", (4, 64, 64)), 3], [3, ("video", (2, 32, 64)), 2,
              ("image", (32, 32)), 2], [4, ("video", (4, 32, 32)), 5], [2, ("image", (64, 64)), 6]]


def build_qwen(attention="eager", num_layers=4, seed=0):
    config = presets.tiny_qwen2_5_vl(num_layers)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return backbone_for(config).stock_model_class(config).eval()


def qwen_video_batch(stock, rows, padding="left", seed=1) -> dict:
    """Padded prompts of `rows` (see QWEN_MIXED): each image or video between the vision start and end tokens, as
    many tokens as its grid (t = frames / temporal patch) merges to, random patches, `mm_token_type_ids` 1 at image
    and 2 at video tokens, and each video's seconds per temporal patch."""
    vision = stock.config.vision_config
    generator = torch.Generator().manual_seed(seed)
    features = 3 * vision.temporal_patch_size * vision.patch_size**2
    grids = {"image": [], "video": []}
    prompts = []
    for row in rows:
        prompt = [BOS]
        for part in row:
            if isinstance(part, int):
                vocab = stock.config.text_config.vocab_size
                prompt += torch.randint(5, vocab - 2, (part,), generator=generator).tolist()
                continue
            kind, shape = part
            frames, height, width = (vision.temporal_patch_size, *shape) if kind == "image" else shape
            grid = (frames // vision.temporal_patch_size, height // vision.patch_size, width // vision.patch_size)
            grids[kind].append(grid)
            count = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2
            prompt += [QWEN_START] + [IMAGE if kind == "image" else VIDEO] * count + [QWEN_END]
        prompts.append(prompt)
    input_ids, attention_mask = checks.padded(prompts, padding, PAD)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask,
                 mm_token_type_ids=(input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int())
    for kind, pixels_name, grid_name in (("image", "pixel_values", "image_grid_thw"),
                                         ("video", "pixel_values_videos", "video_grid_thw")):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            batch[grid_name] = grid
            batch[pixels_name] = torch.randn(int(grid.prod(dim=-1).sum()), features, generator=generator)
    if grids["video"]:
        batch["second_per_grid_ts"] = torch.tensor([0.5 + index for index in range(len(grids["video"]))])
    return batch


@pytest.fixture(scope="module")
def qwen():
    return build_qwen(num_layers=6)


@pytest.fixture(scope="module")
def qwen_sparse(qwen):
    return checks.sparse_of(qwen, seed=3)


def test_qwen_video_positions_are_the_stock_temporal_m_rope(qwen):
    """Each temporal patch of a video moves the time row by tokens_per_second · seconds per patch (the stock
    `get_rope_index`, given the grids and the seconds), not by one."""
    batch = qwen_video_batch(qwen, QWEN_MIXED)
    video_inputs = {name: batch[name] for name in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
    positions = backbone_for(qwen.config).prompt_positions(qwen, batch["input_ids"], batch["attention_mask"],
                                                           image_grid_thw=batch["image_grid_thw"], **video_inputs)
    expected, _ = qwen.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"],
                                            video_grid_thw=batch["video_grid_thw"],
                                            second_per_grid_ts=batch["second_per_grid_ts"],
                                            attention_mask=batch["attention_mask"])
    assert torch.equal(positions, expected)
    times = positions[0, 0][batch["input_ids"][0] == VIDEO].unique()
    assert len(times) == 2 and int(times[1] - times[0]) > 1  # two temporal patches, spaced by the video's time


@pytest.mark.parametrize("rows", [QWEN_VIDEO_ONLY, QWEN_MIXED], ids=["video-only", "image-and-video"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_qwen_dense_logits_equal_stock_on_video_prompts(attention, padding, rows):
    stock = build_qwen(attention)
    batch = qwen_video_batch(stock, rows, padding)
    valid = batch["attention_mask"].bool()
    assert (~valid).any()
    torch.testing.assert_close(logits(checks.dense_of(stock), batch)[valid], logits(stock, batch)[valid], atol=ATOL,
                               rtol=0)


def test_qwen_dense_generation_equals_stock_on_video_prompts(qwen):
    batch = qwen_video_batch(qwen, QWEN_MIXED)
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert torch.equal(checks.dense_of(qwen).generate(**batch, **options), qwen.generate(**batch, **options))


def test_qwen_video_reaches_every_configuration_and_decoding_continues_its_positions(qwen_sparse, qwen):
    batch = qwen_video_batch(qwen, QWEN_VIDEO_ONLY)
    other = dict(batch, pixel_values_videos=batch["pixel_values_videos"] + 1.0)
    text = batch["attention_mask"].bool() & (batch["input_ids"] != VIDEO)
    for configuration in range(len(qwen_sparse.config.configurations)):
        change = logits(qwen_sparse, batch, configuration=configuration) - logits(qwen_sparse, other,
                                                                                  configuration=configuration)
        assert change[text].abs().max() > 1e-3, configuration
        with torch.no_grad():
            cache = qwen_sparse(**batch, configuration=configuration, use_cache=True, logits_to_keep=1).past_key_values
        assert cache.visual_valid.sum(dim=1).tolist() == (batch["input_ids"] == VIDEO).sum(dim=1).tolist()
    mixed = [0, 2, 1]
    generated = qwen_sparse.generate(**batch, configuration=mixed, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        output = qwen_sparse(**batch, configuration=mixed, use_cache=True)
        cache, mask, tokens = output.past_key_values, batch["attention_mask"], []
        for _ in range(4):
            tokens.append(output.logits[:, -1].argmax(dim=-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
            output = qwen_sparse(input_ids=tokens[-1], attention_mask=mask, past_key_values=cache, use_cache=True)
    assert torch.equal(torch.cat(tokens, dim=1), generated[:, batch["input_ids"].shape[1]:])


def test_qwen_bad_video_inputs_are_named(qwen_sparse, qwen):
    batch = qwen_video_batch(qwen, QWEN_VIDEO_ONLY)
    cases = [
        (dict(batch, video_grid_thw=None), "video tokens but video_grid_thw is missing"),
        (dict(batch, pixel_values_videos=None), "video tokens but pixel_values_videos are missing"),
        (dict(batch, pixel_values_videos=batch["pixel_values_videos"][1:]), "pixel_values_videos must be"),
        (dict(batch, second_per_grid_ts=batch["second_per_grid_ts"][:1]), "one value per video"),
        (dict(batch, video_grid_thw=batch["video_grid_thw"][:, 1:]), r"video_grid_thw must be \(num_videos, 3\)"),
        (dict(batch, video_grid_thw=batch["video_grid_thw"].flip(0)), "video-token count does not match"),
    ]
    for inputs, message in cases:
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            qwen_sparse(**inputs)
