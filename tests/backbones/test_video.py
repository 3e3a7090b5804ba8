"""Video through VISOR (LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL): the video token's slots are visual tokens like any
image's.

The dense oracle on video-only and mixed image + video batches (left and right padding, eager and SDPA; LLaVA-OV
with Qwen2 and Llama text), the sparse configurations on video prompts, cached decoding, generation, and the
families that still refuse video. The Qwen-VL prompts are written by hand as each family's processor lays them out
(Qwen3-VL: a timestamp before each temporal patch, DeepStack at the video tokens). Qwen2.5-VL's and Qwen3-VL's
nominal videos: their tokens and FLOPs against the stock forward.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

import family_checks as checks
from visor import presets
from visor.backbones import backbone_for
from visor.backbones.qwen3_vl import Qwen3VL
from visor.config import Schedule
from visor.flops import llm_prefill_flops, prompt_token_counts, video_tokens, video_vision_flops

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


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-internvl3"])
def test_families_without_video_refuse_it_by_name(preset):
    backbone = backbone_for(presets.PRESETS[preset](2))
    assert backbone.video_inputs == ()
    for name in ("pixel_values_videos", "video_grid_thw"):
        with pytest.raises(ValueError, match=f"take no {name}"):
            backbone.select_image_inputs(pixel_values=None, **{name: torch.ones(1, 3)})
    ids = torch.tensor([[IMAGE, VIDEO, 7]])
    assert backbone.visual_token_mask(ids).tolist() == [[True, False, False]]


# ---- Qwen2.5-VL and Qwen3-VL: video patches, M-RoPE over time ------------------------------------------------
QWEN_FAMILIES = ["tiny-qwen2.5-vl", "tiny-qwen3-vl"]
QWEN_START, QWEN_END = presets.TINY_VISION_START_TOKEN_ID, presets.TINY_VISION_END_TOKEN_ID
# Each row's parts: words, an image of (height, width), or a video of (frames, height, width).
QWEN_VIDEO_ONLY = [[3, ("video", (4, 64, 64)), 4], [2, ("video", (2, 32, 64)), 7], [5, ("video", (6, 32, 32)), 1]]
QWEN_MIXED = [[2, ("image", (64, 96)), 2, ("video", (4, 64, 64)), 3], [3, ("video", (2, 32, 64)), 2,
              ("image", (32, 32)), 2], [4, ("video", (4, 32, 32)), 5], [2, ("image", (64, 64)), 6]]


def build_qwen(preset="tiny-qwen2.5-vl", attention="eager", num_layers=4, seed=0):
    config = presets.PRESETS[preset](num_layers)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return backbone_for(config).stock_model_class(config).eval()


def timestamp_ids(seconds: float) -> list[int]:
    """Ids standing for the text "<t seconds>" the Qwen3-VL processor writes before a temporal patch (one per
    character, clear of the special ids)."""
    return [5 + ord(character) % (presets.TINY_VOCAB_SIZE - 7) for character in f"<{seconds:.1f} seconds>"]


def video_ids(stock, grid, seconds: float) -> list[int]:
    """A video of `grid` (temporal patches, patch rows, patch columns) between its vision start and end tokens, as
    the family's processor lays it out: Qwen2.5-VL one run of video tokens; Qwen3-VL one run per temporal patch,
    each after its timestamp (mid-patch, `seconds` per patch) and between start and end tokens of its own."""
    per_patch = grid[1] * grid[2] // stock.config.vision_config.spatial_merge_size**2
    if not isinstance(backbone_for(stock.config), Qwen3VL):
        return [QWEN_START] + [VIDEO] * grid[0] * per_patch + [QWEN_END]
    frames = [timestamp_ids((patch + 0.5) * seconds) + [QWEN_START] + [VIDEO] * per_patch + [QWEN_END]
              for patch in range(grid[0])]
    return [QWEN_START] + sum(frames, []) + [QWEN_END]


def qwen_video_batch(stock, rows, padding="left", seed=1) -> dict:
    """Padded prompts of `rows` (see QWEN_MIXED): each image between the vision start and end tokens, as many
    tokens as its grid merges to, each video as `video_ids` lays it out (t = frames / temporal patch, 0.5 + its
    index seconds per temporal patch), random patches, `mm_token_type_ids` 1 at image and 2 at video tokens, and,
    for a family that reads them (Qwen2.5-VL), each video's seconds per temporal patch."""
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
            if kind == "video":
                prompt += video_ids(stock, grid, 0.5 + len(grids["video"]) - 1)
                continue
            prompt += [QWEN_START] + [IMAGE] * (grid[1] * grid[2] // vision.spatial_merge_size**2) + [QWEN_END]
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
    if grids["video"] and "second_per_grid_ts" in backbone_for(stock.config).video_inputs:
        batch["second_per_grid_ts"] = torch.tensor([0.5 + index for index in range(len(grids["video"]))])
    return batch


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen(request):
    return build_qwen(request.param, num_layers=6)


@pytest.fixture(scope="module")
def qwen_sparse(qwen):
    return checks.sparse_of(qwen, seed=3)


def stock_positions(stock, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """VISOR's positions of `batch` (given only its video arguments and image grids) and the stock
    `get_rope_index`'s."""
    video_inputs = {name: batch[name] for name in backbone_for(stock.config).video_inputs}
    positions = backbone_for(stock.config).prompt_positions(stock, batch["input_ids"], batch["attention_mask"],
                                                            image_grid_thw=batch["image_grid_thw"], **video_inputs)
    video_inputs.pop("pixel_values_videos")
    expected, _ = stock.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"],
                                             attention_mask=batch["attention_mask"], **video_inputs)
    return positions, expected


def test_qwen_video_positions_are_the_stock_temporal_m_rope():
    """Qwen2.5-VL: each temporal patch of a video moves the time row by tokens_per_second · seconds per patch (the
    stock `get_rope_index`, given the grids and the seconds), not by one."""
    stock = build_qwen(num_layers=2)
    batch = qwen_video_batch(stock, QWEN_MIXED)
    positions, expected = stock_positions(stock, batch)
    assert torch.equal(positions, expected)
    times = positions[0, 0][batch["input_ids"][0] == VIDEO].unique()
    assert len(times) == 2 and int(times[1] - times[0]) > 1  # two temporal patches, spaced by the video's time


def test_qwen3_video_patches_sit_as_one_frame_images_after_their_timestamps():
    """Qwen3-VL: each temporal patch's run of video tokens sits as a one-frame image would (one time position, its
    rows and columns from there, as the stock `get_rope_index` on the per-patch grids), and the next patch starts
    after the run's longer side, the end token, the next timestamp and the start token."""
    stock = build_qwen("tiny-qwen3-vl", num_layers=2)
    batch = qwen_video_batch(stock, QWEN_MIXED)
    positions, expected = stock_positions(stock, batch)
    assert torch.equal(positions, expected)
    side = 4  # sample 0's video: two temporal patches of 64x64 pixels, 8x8 patches, 4x4 merged
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    layout = torch.stack([torch.zeros(side**2, dtype=torch.long), rows.flatten(), columns.flatten()])
    runs = positions[:, 0, batch["input_ids"][0] == VIDEO].reshape(3, 2, side**2)
    for run in runs.unbind(dim=1):
        assert torch.equal(run, run[0, 0] + layout)
    assert int(runs[0, 1, 0] - runs[0, 0, 0]) == side + 1 + len(timestamp_ids(1.5 * 0.5)) + 1


@pytest.mark.parametrize("frames", [2, 3])
@pytest.mark.parametrize("preset", QWEN_FAMILIES)
def test_qwen_nominal_video_is_counted_as_the_stock_forward_runs_it(preset, frames):
    """A video of nominal frames (the largest square frame the stock video processor keeps whole at that many
    frames; 3 frames fill 2 temporal patches): its tokens are what the stock video path returns and the stock
    forward accepts (Qwen3-VL: a run per temporal patch, a word between two, `Backbone.video_layout`), and the
    prompt's FLOPs (the tower once per temporal patch, then the LLM) are what FlopCounterMode counts, exactly."""
    stock = build_qwen(preset, num_layers=2)
    backbone = backbone_for(stock.config)
    temporal, visual = video_tokens(stock.config, frames)
    video = backbone.nominal_video_pixel_inputs(frames)
    assert temporal == -(-frames // stock.config.vision_config.temporal_patch_size)
    assert video["video_grid_thw"].tolist() == [list(backbone.video_grid(frames))]
    with torch.no_grad():
        features = backbone.encode_videos(stock, visual, **video)
    assert [clip.shape[-2] for clip in features] == [visual]
    first, *runs = backbone.video_layout(frames)
    assert len(runs) == (temporal - 1 if isinstance(backbone, Qwen3VL) else 0) and first + sum(runs) == visual
    ids = [VIDEO] * first
    for run in runs:
        ids += [11] + [VIDEO] * run
    text = [BOS, 7, 8, QWEN_START, QWEN_END, 9, 10]
    input_ids = torch.tensor([text[:4] + ids + text[4:]])
    prompt = dict(input_ids=input_ids, mm_token_type_ids=2 * (input_ids == VIDEO).int(), **video)
    words = len(text) + len(runs)
    assert prompt_token_counts(stock.config, prompt) == (torch.tensor([visual]), torch.tensor([words]))
    full = llm_prefill_flops(stock.config, visual, words, Schedule.full(stock.config), visual + words)
    assert checks.counted(lambda: stock(**prompt)) == video_vision_flops(stock.config, frames).total + full.total


def test_the_qwen2_5_vl_3b_preset_has_a_nominal_video_of_27x27_tokens_per_temporal_patch():
    """The released shapes (`visor bench --preset qwen2.5-vl-3b --video-frames`): 756-pixel frames (the stock
    bound of 768 · 28² pixels, in whole 28-pixel merged patches), two frames per temporal patch."""
    from visor.bench import BenchPlan

    config = presets.PRESETS["qwen2.5-vl-3b"]()
    backbone = backbone_for(config)
    assert BenchPlan("qwen2.5-vl-3b", video_frames=(8, 32)).visual_tokens == (4 * 27 * 27, 16 * 27 * 27)
    assert backbone.largest_frame_size(32) == (756, 756)
    assert video_tokens(config, 32) == (16, 16 * 27 * 27)
    assert backbone.nominal_video_inputs(32)["video_grid_thw"].tolist() == [[16, 54, 54]]
    per_frame_grid = backbone.grid_flops(54, 54)
    assert video_vision_flops(config, 31).parts == {part: 16 * flops for part, flops in per_frame_grid.items()}


def test_the_qwen3_vl_2b_preset_s_nominal_video_frames_shrink_to_the_stock_bounds():
    """The released shapes (`visor bench --preset qwen3-vl-2b --video-frames`): the stock video processor's pixel
    bounds hold all a video's frames together (its 3-D `smart_resize`), so the nominal frame is the largest square of
    32-pixel merged patches it keeps whole at that many frames (the next one up it shrinks), two frames per temporal
    patch, the tower once per temporal patch."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize

    from visor.bench import BenchPlan

    config = presets.PRESETS["qwen3-vl-2b"]()
    backbone = backbone_for(config)
    bounds = dict(min_pixels=Qwen3VLVideoProcessor.size["shortest_edge"],
                  max_pixels=Qwen3VLVideoProcessor.size["longest_edge"])
    expected = []
    for frames in (8, 32):
        side, width = backbone.largest_frame_size(frames)
        assert side == width and side % 32 == 0 and smart_resize(frames, side, side, 2, 32, **bounds) == (side, side)
        assert smart_resize(frames, side + 32, side + 32, 2, 32, **bounds) != (side + 32, side + 32)
        assert backbone.nominal_video_inputs(frames)["video_grid_thw"].tolist() == [[frames // 2, side // 16,
                                                                                      side // 16]]
        per_patch = backbone.grid_flops(side // 16, side // 16)
        assert video_vision_flops(config, frames).parts == {part: frames // 2 * flops for part, flops in
                                                            per_patch.items()}
        expected.append(frames // 2 * (side // 32) ** 2)
    assert backbone.largest_frame_size(32) < backbone.largest_frame_size(8)
    assert BenchPlan("qwen3-vl-2b", video_frames=(8, 32)).visual_tokens == tuple(expected)


def test_qwen_video_geometry_refuses_an_empty_video_and_qwen3_a_single_frame():
    with pytest.raises(ValueError, match="at least one frame"):
        video_tokens(presets.tiny_qwen2_5_vl(2), 0)
    with pytest.raises(ValueError, match="a Qwen3VL video needs at least 2 frames"):
        video_tokens(presets.tiny_qwen3_vl(2), 1)


@pytest.mark.parametrize("rows", [QWEN_VIDEO_ONLY, QWEN_MIXED], ids=["video-only", "image-and-video"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("preset", QWEN_FAMILIES)
def test_qwen_dense_logits_equal_stock_on_video_prompts(preset, attention, padding, rows):
    stock = build_qwen(preset, attention)
    batch = qwen_video_batch(stock, rows, padding)
    valid = batch["attention_mask"].bool()
    assert (~valid).any()
    torch.testing.assert_close(logits(checks.dense_of(stock), batch)[valid], logits(stock, batch)[valid], atol=ATOL,
                               rtol=0)


def test_qwen3_deepstack_reaches_the_video_tokens():
    """Guard for the oracle above: without the video's DeepStack additions (its features given as (n, d)), the
    dense model no longer equals the stock one, and every sparse configuration's text reads them too."""
    stock = build_qwen("tiny-qwen3-vl", num_layers=6)
    batch = qwen_video_batch(stock, QWEN_VIDEO_ONLY)
    dense = checks.dense_of(stock)
    with torch.no_grad():
        features = dense.backbone.encode_videos(dense, 0, pixel_values_videos=batch["pixel_values_videos"],
                                                video_grid_thw=batch["video_grid_thw"])
    assert [video.shape[0] for video in features] == [3] * 3  # the features, then two DeepStack layers
    valid = batch["attention_mask"].bool()
    expected = logits(stock, batch)[valid]
    stacked = dict(batch, pixel_values_videos=None, video_features=features)
    flat = dict(stacked, video_features=[video[0] for video in features])
    torch.testing.assert_close(logits(dense, stacked)[valid], expected, atol=ATOL, rtol=0)
    assert (logits(dense, flat)[valid] - expected).abs().max() > 1e-3
    sparse = checks.sparse_of(stock, seed=3)
    text = valid & (batch["input_ids"] != VIDEO)
    for configuration in range(len(sparse.config.configurations)):
        change = logits(sparse, stacked, configuration=configuration) - logits(sparse, flat, configuration=configuration)
        assert change[text].abs().max() > 1e-3, configuration


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
    checks.the_cache_holds_visual_entries_for_ca_and_the_sa_layers_used(qwen_sparse, batch)
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


def test_qwen_in_llm_baselines_off_equal_stock_on_video_prompts(qwen):
    """FastV, SparseVLM and ShortV at no reduction are the stock model on mixed image + video prompts (positions,
    DeepStack at the video tokens included), and FastV generates with its cache as the stock model does."""
    checks.in_llm_baselines_off_equal_stock_and_generate_with_the_cache(qwen, qwen_video_batch(qwen, QWEN_MIXED), PAD)


def test_qwen_bad_video_inputs_are_named(qwen_sparse, qwen):
    batch = qwen_video_batch(qwen, QWEN_VIDEO_ONLY)
    cases = [
        (dict(batch, video_grid_thw=None), "video tokens but video_grid_thw is missing"),
        (dict(batch, pixel_values_videos=None), "video tokens but pixel_values_videos are missing"),
        (dict(batch, pixel_values_videos=batch["pixel_values_videos"][1:]), "pixel_values_videos must be"),
        (dict(batch, video_grid_thw=batch["video_grid_thw"][:, 1:]), r"video_grid_thw must be \(num_videos, 3\)"),
        (dict(batch, video_grid_thw=batch["video_grid_thw"].flip(0)), "video-token count does not match"),
    ]
    if "second_per_grid_ts" in batch:
        cases.append((dict(batch, second_per_grid_ts=batch["second_per_grid_ts"][:1]), "one value per video"))
    else:
        seconds = torch.ones(len(batch["video_grid_thw"]))
        cases.append((dict(batch, second_per_grid_ts=seconds), "models take no second_per_grid_ts"))
        # Qwen3-VL: each temporal patch is a run of its own; a grid of as many tokens in other runs is named.
        grids = batch["video_grid_thw"].clone()
        grids[0] = torch.tensor([1, 8, 16])  # sample 0's video is two runs of 4x4 tokens, not one of 4x8
        cases.append((dict(batch, video_grid_thw=grids), r"runs of \[16, 16, .*video_grid_thw gives \[32,"))
        # Mixed with images that bring DeepStack layers, video features without them are refused.
        mixed = qwen_video_batch(qwen, QWEN_MIXED)
        with torch.no_grad():
            features = qwen_sparse.backbone.encode_videos(qwen_sparse, 0, mixed["pixel_values_videos"],
                                                          mixed["video_grid_thw"])
        cases.append((dict(mixed, pixel_values_videos=None, video_features=[video[0] for video in features]),
                      "the video features hold 0 DeepStack layers, the images' 2"))
    for inputs, message in cases:
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            qwen_sparse(**inputs)

