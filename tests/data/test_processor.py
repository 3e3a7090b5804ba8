"""The processor: token counts the stock model accepts, labels, padding, per-patch targets and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from visor import presets
from visor.flops import image_tokens
from visor.data.frames import Clip
from visor.data.processor import VisorProcessor, load_image
from visor.data.render import CLASS_ID, IGNORE_INDEX
from visor.data.tasks import make_sample

ODD_SIZES = [(128, 128), (64, 64), (37, 200), (200, 37), (100, 130), (8, 8), (300, 500), (64, 128), (129, 64)]


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_stock_forward_accepts_every_crop_layout_in_a_padded_batch(stock_models, tokenizer, preset, padding_side):
    model = stock_models[preset]
    processor = VisorProcessor(model.config, tokenizer, padding_side=padding_side)
    questions = ["what is it ?", "how many red marks are there ?", "is there a large circle ?"] * 3
    batch = processor(_images(ODD_SIZES), questions, answers=["red"] * len(ODD_SIZES))
    counts = (batch["input_ids"] == presets.TINY_IMAGE_TOKEN_ID).sum(1).tolist()
    assert counts == [image_tokens(model.config, size).visual_tokens for size in ODD_SIZES]
    assert len(set(counts)) > 3  # layouts really differ
    assert batch["pixel_values"].shape == (9, 5, 3, 64, 64)
    with torch.no_grad():  # the stock model raises when image tokens and features disagree
        output = model(**batch)
    assert torch.isfinite(output.loss)


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_qwen_vl_inputs_are_what_the_stock_model_reads(tokenizer, preset):
    from visor.backbones import backbone_for

    config = presets.PRESETS[preset](num_layers=1)
    torch.manual_seed(0)
    model = backbone_for(config).stock_model_class(config).eval()
    processor = VisorProcessor(config, tokenizer, padding_side="left")
    batch = processor(_images(ODD_SIZES), ["what is it ?"] * len(ODD_SIZES), answers=["red"] * len(ODD_SIZES))
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "labels"}
    counts = (batch["input_ids"] == presets.TINY_IMAGE_TOKEN_ID).sum(1).tolist()
    assert counts == [image_tokens(config, size).visual_tokens for size in ODD_SIZES] and len(set(counts)) > 3
    assert counts == (batch["image_grid_thw"].prod(dim=1) // 4).tolist()
    for row, count in zip(batch["input_ids"], counts):  # the image's tokens sit between its start and end tokens
        start = int((row == presets.TINY_VISION_START_TOKEN_ID).nonzero())
        assert int((row == presets.TINY_VISION_END_TOKEN_ID).nonzero()) == start + count + 1
    assert batch["pixel_values"].shape == (int(batch["image_grid_thw"].prod(dim=1).sum()), 3 * 2 * 8 * 8)
    with torch.no_grad():  # the stock model raises when image tokens and features disagree
        output = model(**batch)
    assert torch.isfinite(output.loss)
    with pytest.raises(ValueError, match="patch targets"):
        processor(_images([(64, 64)]), ["what ?"], class_maps=[np.zeros((64, 64), dtype=np.int64)])


def test_internvl_inputs_are_what_the_stock_model_reads(tokenizer):
    """Every image tiled, its tiles' tokens alone (the word tokenizer names no <img> / </img> markers)."""
    from visor.backbones import backbone_for

    config = presets.tiny_internvl3(num_layers=1)
    torch.manual_seed(0)
    model = backbone_for(config).stock_model_class(config).eval()
    processor = VisorProcessor(config, tokenizer, padding_side="left")
    batch = processor(_images(ODD_SIZES), ["what is it ?"] * len(ODD_SIZES), answers=["red"] * len(ODD_SIZES))
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels"}
    counts = (batch["input_ids"] == presets.TINY_IMAGE_TOKEN_ID).sum(1).tolist()
    assert counts == [image_tokens(config, size).visual_tokens for size in ODD_SIZES] and len(set(counts)) > 3
    assert batch["pixel_values"].shape == (sum(counts) // 16, 3, 64, 64)
    largest = processor.images.largest_image_size()  # 4 x 3 tiles and the thumbnail
    assert largest == backbone_for(config).largest_image_size() == (256, 192)
    assert processor.images.token_count(largest, 1) == 13 * 16
    with torch.no_grad():  # the stock model raises when image tokens and features disagree
        output = model(**batch)
    assert torch.isfinite(output.loss)
    with pytest.raises(ValueError, match="patch targets"):
        processor(_images([(64, 64)]), ["what ?"], class_maps=[np.zeros((64, 64), dtype=np.int64)])


def test_anyres_max_shrink_and_larger_pinpoint_lists_match_the_stock_model(tokenizer):
    from transformers import LlavaOnevisionForConditionalGeneration

    config = presets.tiny(num_layers=1)
    config.image_grid_pinpoints = [[64 * h, 64 * w] for h in range(1, 4) for w in range(1, 4)]
    config.vision_aspect_ratio = "anyres_max_1"  # grids above ~1 crop of features get interpolated down
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    processor = VisorProcessor(config, tokenizer)
    sizes = [(190, 190), (70, 180), (150, 60)]
    batch = processor(_images(sizes), ["what is it ?"] * 3)
    plain = presets.tiny_llama(num_layers=1)
    plain.image_grid_pinpoints = config.image_grid_pinpoints
    assert image_tokens(config, (190, 190)).visual_tokens < image_tokens(plain, (190, 190)).visual_tokens
    with torch.no_grad():
        model(**batch)


def test_labels_cover_only_the_answer_and_eos_and_padding_sides_differ(tokenizer):
    config = presets.tiny()
    sample = make_sample("bar_value", "train", 0)
    right = VisorProcessor(config, tokenizer, "right")([sample.image] * 2, [sample.question, "what ?"],
                                                       [sample.answer, "yes"])
    labels = right["labels"][0]
    answer_ids = labels[labels != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids[:-1]) == sample.answer and answer_ids[-1] == tokenizer.eos_token_id
    assert (right["input_ids"][0][labels != IGNORE_INDEX] == answer_ids).all()
    assert right["attention_mask"][1, -1] == 0 and right["input_ids"][1, -1] == tokenizer.pad_token_id
    left = VisorProcessor(config, tokenizer, "left")([sample.image] * 2, [sample.question, "what ?"])
    assert "labels" not in left
    assert left["attention_mask"][:, -1].tolist() == [1, 1] and left["attention_mask"][1, 0] == 0
    prompt = tokenizer.decode(left["input_ids"][0][left["input_ids"][0] != presets.TINY_IMAGE_TOKEN_ID])
    assert prompt == f"<s> user : {sample.question.replace(' ?', '?')} assistant :"


def test_text_is_a_small_fraction_of_the_tokens_at_the_default_resolution(tokenizer):
    processor = VisorProcessor(presets.tiny(), tokenizer)
    for task in ("read_cell", "bar_value", "count_marks", "dominant_color", "has_shape"):
        sample = make_sample(task, "train", 0)
        ids = processor(sample.image, sample.question)["input_ids"][0]
        visual = int((ids == presets.TINY_IMAGE_TOKEN_ID).sum())
        assert visual >= 20 * (len(ids) - visual), task


def test_patch_targets_align_with_the_crops_in_pixel_values(tokenizer):
    """Paint each class a distinct grey level: the most common level in each crop patch must be its target."""
    processor = VisorProcessor(presets.tiny(), tokenizer)
    rng = np.random.default_rng(0)
    for height, width in [(128, 128), (100, 170), (150, 60), (64, 64)]:
        blocks = rng.integers(1, 20, size=(height // 32 + 1, width // 32 + 1))
        class_map = np.kron(blocks, np.ones((32, 32), dtype=np.int64))[:height, :width].astype(np.int16)
        image = Image.fromarray(np.repeat((class_map * 12)[..., None], 3, axis=-1).astype(np.uint8))
        batch = processor(image, "what ?", class_maps=class_map)
        targets = batch["patch_targets"][0]  # (crops, 64)
        pixels = batch["pixel_values"][0, :, 0]  # red channel, normalised to [-1, 1]
        patches = pixels.reshape(len(pixels), 8, 8, 8, 8).transpose(2, 3).reshape(len(pixels), 64, 64)
        shown = torch.round((patches + 1) * 127.5 / 12).mode(dim=-1).values
        known = targets != IGNORE_INDEX
        assert (shown[known] == targets[known]).float().mean() > 0.9, (height, width)
        assert (shown[~known] == 0).all()  # ignored patches are mostly zero padding
        if (height, width) == (128, 128):  # a pinpoint size: crops are exact tiles, no resampling blur
            assert torch.equal(shown, targets.to(shown.dtype))
        assert (known.sum() < known.numel()) == (height != width)


def test_patch_targets_keep_four_pixel_marks(tokenizer):
    processor = VisorProcessor(presets.tiny(), tokenizer)
    for index in range(3):
        sample = make_sample("count_marks", "train", index)
        targets = processor(sample.image, sample.question, class_maps=sample.class_map)["patch_targets"][0]
        colour = CLASS_ID[sample.question.split()[2]]
        # every counted mark lies in one or a few patches of the 2x2 tiles; the tiles together see each mark
        assert int((targets[1:] == colour).sum()) >= int(sample.answer)
        assert ((targets[0] == colour).any()) == (sample.answer != "0")


def test_grayscale_rgba_and_palette_images_are_converted(tokenizer):
    processor = VisorProcessor(presets.tiny(), tokenizer)
    gray = Image.new("L", (80, 60), 128)
    rgba = Image.new("RGBA", (80, 60), (255, 0, 0, 0))  # fully transparent red: white after compositing
    palette = Image.new("RGB", (80, 60), (0, 0, 255)).convert("P")
    for image in (gray, rgba, palette, np.zeros((60, 80), dtype=np.uint8)):
        assert load_image(image).mode == "RGB"
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    batch = processor([gray, rgba, palette], ["what ?"] * 3)
    assert batch["pixel_values"].shape[:3] == (3, 3, 3)


def test_bad_input_gives_clear_errors(tokenizer, tmp_path):
    processor = VisorProcessor(presets.tiny(), tokenizer)
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="smaller than one 8x8 vision patch"):
        processor(Image.new("RGB", (5, 40)), "what ?")
    with pytest.raises(ValueError, match="non-empty"):
        processor(image, "   ")
    with pytest.raises(ValueError, match="non-empty"):
        processor(image, "what ?", answers="")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        processor(str(text_file), "what ?")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated"):
        processor(truncated, "what ?")
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True  # as lmms-eval leaves it
    try:
        with pytest.raises(ValueError, match="truncated"):
            processor(truncated, "what ?")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    with pytest.raises(ValueError, match="does not exist"):
        processor(tmp_path / "missing.png", "what ?")
    with pytest.raises(ValueError, match="2 questions"):
        processor([image], ["a ?", "b ?"])
    with pytest.raises(ValueError, match="must not contain <image>"):
        processor(image, "<image> what ?")
    with pytest.raises(ValueError, match="padding_side"):
        VisorProcessor(presets.tiny(), tokenizer, padding_side="middle")


def test_tokenizer_and_config_must_agree_on_the_image_token(tokenizer):
    config = presets.tiny()
    config.image_token_id = 7
    with pytest.raises(ValueError, match="image_token_id"):
        VisorProcessor(config, tokenizer)


def test_decode_stops_at_eos(tokenizer):
    processor = VisorProcessor(presets.tiny(), tokenizer)
    ids = tokenizer("blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id, 9, 9]
    assert processor.decode(torch.tensor(ids)) == "blue"


def test_the_released_llava_ov_crop_of_patches_that_do_not_tile_it_is_processed(tokenizer):
    """LLaVA-OneVision's real crops (384 px) are not whole 14-px patches (SigLIP reads 27 x 27 of them): the
    processor takes them (only patch targets need whole patches, and say so)."""
    config = presets.llava_ov_0_5b()
    config.image_token_id = presets.TINY_IMAGE_TOKEN_ID
    processor = VisorProcessor(config, tokenizer, padding_side="left")
    batch = processor(_images([(300, 500)]), ["what is it ?"])
    count = int((batch["input_ids"] == presets.TINY_IMAGE_TOKEN_ID).sum())
    assert count == image_tokens(config, (300, 500)).visual_tokens and batch["pixel_values"].shape[-1] == 384
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        processor(_images([(300, 500)]), ["what ?"], class_maps=[np.zeros((300, 500), dtype=np.int64)])


# ---- videos ------------------------------------------------------------------------------------------------------
def _gif(path, frames: int, size=(40, 30), seed=0):
    first, *rest = _images([size[::-1]] * frames, seed)
    first.save(path, save_all=True, append_images=rest, duration=100, loop=0)
    return path


def _videos(tmp_path):
    """Three videos read three ways: an animated GIF of 9 frames, a folder of 6 frames, a list of 4 frames."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(_images([(50, 70)] * 6, seed=1)):
        frame.save(folder / f"{index:02d}.png")
    return [_gif(tmp_path / "clip.gif", 9), folder, _images([(64, 64)] * 4, seed=2)]


@pytest.mark.parametrize("with_images", [False, True], ids=["videos", "images-and-videos"])
def test_video_prompts_are_what_the_stock_model_reads(stock_models, tokenizer, tmp_path, with_images):
    """Each video sampled to 4 frames and expanded to the stock model's own count of its features; the stock model
    (which raises on a mismatch) and dense VISOR read the batch alike."""
    from visor import VisorConfig, VisorForConditionalGeneration

    model = stock_models["tiny"]
    processor = VisorProcessor(model.config, tokenizer, padding_side="left")
    images = _images([(64, 128), (50, 120), (128, 128)]) if with_images else None
    batch = processor(images, ["what happens ?", "what moves ?", "how many ?"], videos=_videos(tmp_path),
                      num_frames=4)
    assert batch["pixel_values_videos"].shape == (3, 4, 3, 64, 64)
    assert ("pixel_values" in batch) == with_images
    with torch.no_grad():
        features = model.model.get_video_features(batch["pixel_values_videos"], return_dict=True).pooler_output
        expected = model(**batch).logits
        dense = VisorForConditionalGeneration.from_stock(model, VisorConfig.dense(model.config)).eval()
        actual = dense(**batch).logits
    assert (batch["input_ids"] == presets.TINY_VIDEO_TOKEN_ID).sum(1).tolist() == [features.shape[1]] * 3
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=0)


def test_videos_keep_the_checkpoint_s_frame_count_and_refuse_uneven_ones(tokenizer, tmp_path):
    from visor.data.frames import VideoSettings, load_video_settings

    settings = VideoSettings(size=(64, 64), image_mean=(0.5,) * 3, image_std=(0.5,) * 3, num_frames=3)
    processor = VisorProcessor(presets.tiny(), tokenizer, video_settings=settings)
    gif = _gif(tmp_path / "clip.gif", 9)
    assert processor(None, "what ?", videos=gif)["pixel_values_videos"].shape == (1, 3, 3, 64, 64)
    assert processor(None, "what ?", videos=gif, num_frames=5)["pixel_values_videos"].shape[1] == 5
    with pytest.raises(ValueError, match=r"same number of frames, got \[2, 3\]"):
        processor(None, ["a ?", "b ?"], videos=[gif, _images([(64, 64)] * 2)])
    processor.save_pretrained(tmp_path / "saved")
    saved = load_video_settings(tmp_path / "saved", processor.backbone, processor.images.image_processor)
    assert saved == settings


def test_conversations_place_videos_where_their_parts_are(tokenizer, tmp_path):
    """A video part or `<video>` placeholder in any turn, beside images, in prompt order."""
    processor = VisorProcessor(presets.tiny(), tokenizer, padding_side="right")
    gif = _gif(tmp_path / "clip.gif", 2)
    messages = [{"role": "user", "content": "<video>\nfirst ? <image>\nthen"}, {"role": "assistant", "content": "red"}]
    batch = processor.conversations([[Image.new("RGB", (64, 64))]], [messages], videos=[[gif]])
    ids = batch["input_ids"][0].tolist()
    video, image = ids.index(presets.TINY_VIDEO_TOKEN_ID), ids.index(presets.TINY_IMAGE_TOKEN_ID)
    assert video < image and ids.count(presets.TINY_VIDEO_TOKEN_ID) == 2 * 16 + 1
    assert (batch["labels"][0] != -100).sum() == 2  # "red" and the end of the sequence
    with pytest.raises(ValueError, match="has 1 video placeholders but 0 videos"):
        processor.conversations([[Image.new("RGB", (64, 64))]], [messages])
    with pytest.raises(ValueError, match="must not contain <video>"):
        processor(None, "<video> what ?", videos=gif)
    with pytest.raises(ValueError, match="each row needs an image or a video"):
        processor(None, "what ?")


def test_families_and_tokenizers_without_video_refuse_videos(tokenizer, tmp_path):
    gif = _gif(tmp_path / "clip.gif", 2)
    with pytest.raises(ValueError, match="Qwen2VL models take no video"):
        VisorProcessor(presets.tiny_qwen2_vl(), tokenizer)(None, "what ?", videos=gif)
    with pytest.raises(ValueError, match="InternVL models take no video"):
        VisorProcessor(presets.tiny_internvl3(), tokenizer)(None, "what ?", videos=gif)
    config = presets.tiny()
    config.video_token_id = 9  # a word of the tokenizer, not its <video> token
    processor = VisorProcessor(config, tokenizer)
    assert processor(Image.new("RGB", (64, 64)), "what ?")["input_ids"].shape[0] == 1  # images still work
    with pytest.raises(ValueError, match="video_token_id names"):
        processor(None, "what ?", videos=gif)


# ---- Qwen2.5-VL videos -------------------------------------------------------------------------------------------
def _qwen_processor(tokenizer, **settings):
    from visor.data.frames import GridVideoSettings

    config = presets.tiny_qwen2_5_vl(num_layers=2)
    video_settings = None if not settings else GridVideoSettings(**{
        "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3,
        **settings})
    return VisorProcessor(config, tokenizer, padding_side="left", video_settings=video_settings)


def _patches_by_frame(pixels, temporal=2, patch=8):
    """(patches, 3·T·p²) -> (patches, T, 3, p²): each position of the temporal patch apart."""
    return pixels.reshape(len(pixels), 3, temporal, patch**2).transpose(0, 2, 1, 3)


def _still_clip_is_the_stock_frame(processor, frame_processor):
    """Five moving frames, each through the stock image processor alone (`frame_processor`); checks that a still
    clip of the first (two copies: one temporal patch) is exactly its stock pixels and grid. Returns the frames,
    the stock outputs and the grid."""
    frames = _images([(50, 120)] * 5, seed=3)
    stock = [frame_processor([frame], return_tensors="np") for frame in frames]
    grid = stock[0]["image_grid_thw"][0].tolist()
    still = processor(None, "what is it ?", videos=[[frames[0]] * 2])
    np.testing.assert_array_equal(still["pixel_values_videos"].numpy(), stock[0]["pixel_values"])
    assert still["video_grid_thw"].tolist() == [grid]
    return frames, stock, grid


def test_qwen2_5_vl_frames_are_the_stock_image_processor_s_pixels_in_temporal_patches(tokenizer):
    """The image path repeats a still image over the temporal patch: a clip of that many copies of one frame is
    exactly the stock PIL image processor's pixels of the frame at the same pixel bounds. Each frame of a moving
    clip is its own temporal position (frame 2k first, 2k + 1 second), the last one repeated to fill the last."""
    processor = _qwen_processor(tokenizer, min_pixels=4 * 256, max_pixels=64 * 256)
    frame_processor = processor.videos.settings.frame_processor(processor.backbone)
    assert frame_processor.size == {"shortest_edge": 4 * 256, "longest_edge": 64 * 256}
    frames, stock, grid = _still_clip_is_the_stock_frame(processor, frame_processor)
    moving = processor(None, "what is it ?", videos=[frames])
    per_patch = grid[1] * grid[2]
    pixels = _patches_by_frame(moving["pixel_values_videos"].numpy()).reshape(3, per_patch, 2, 3, 64)
    for index, frame in enumerate([*range(5), 4]):  # the fifth frame fills the third temporal patch
        expected = _patches_by_frame(stock[frame]["pixel_values"])[:, 0]
        np.testing.assert_array_equal(pixels[index // 2, :, index % 2], expected)
    assert moving["video_grid_thw"].tolist() == [[3, *grid[1:]]]


@pytest.mark.parametrize("frames", [1, 3, 4])
def test_qwen2_5_vl_video_grids_tokens_and_token_types(tokenizer, frames):
    """Odd frame counts round up to whole temporal patches; non-square frames keep their aspect in whole merged
    patches; each video's tokens (its grid's merged patches) sit between the vision start and end tokens, token
    type 2; seconds per temporal patch at the stock rate for untimed frames (24 a second)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    processor = _qwen_processor(tokenizer)
    sizes = [(30, 40), (100, 37), (64, 64)]
    videos = [_images([size] * frames, seed=index) for index, size in enumerate(sizes)]
    batch = processor(None, ["what moves ?", "what is it ?", "how many ?"], videos=videos)
    expected = [[-(-frames // 2), *(side // 8 for side in smart_resize(*size, 16, 56 * 56, 28 * 28 * 1280))]
                for size in sizes]
    assert batch["video_grid_thw"].tolist() == expected and len({tuple(grid) for grid in expected}) == 3
    assert batch["pixel_values_videos"].shape == (sum(t * h * w for t, h, w in expected), 3 * 2 * 8 * 8)
    torch.testing.assert_close(batch["second_per_grid_ts"], torch.full((3,), 2 / 24))
    counts = (batch["input_ids"] == presets.TINY_VIDEO_TOKEN_ID).sum(1).tolist()
    assert counts == [t * h * w // 4 for t, h, w in expected]
    assert counts == [processor.videos.token_count(Clip.of(video)) for video in videos]
    for row, count in zip(batch["input_ids"], counts):
        start = int((row == presets.TINY_VISION_START_TOKEN_ID).nonzero())
        assert int((row == presets.TINY_VISION_END_TOKEN_ID).nonzero()) == start + count + 1
    assert torch.equal(batch["mm_token_type_ids"], 2 * (batch["input_ids"] == presets.TINY_VIDEO_TOKEN_ID).int())


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_vl_tokens_of_the_nominal_video_are_the_adapter_s(tokenizer, family):
    """At the stock video processor's default bounds, a clip of the adapter's largest frame for its frame count has
    the tokens the adapter counts for a nominal video (`Backbone.video_tokens`, what FLOPs and benches use)."""
    make = _qwen_processor if family == "qwen2.5-vl" else _qwen3_processor
    backbone = make(tokenizer).backbone
    processor = make(tokenizer, min_pixels=backbone.min_frame_pixels, max_pixels=backbone.max_frame_pixels)
    for frames in (1, 2, 5) if family == "qwen2.5-vl" else (2, 3, 5, 8):
        height, width = backbone.largest_frame_size(frames)
        clip = Clip.of([Image.new("RGB", (width, height))] * frames)
        assert processor.videos.token_count(clip) == backbone.video_tokens(frames).visual_tokens
        assert processor.videos.grid(clip) == backbone.video_grid(frames)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_qwen2_5_vl_video_batches_give_dense_visor_the_stock_logits(tokenizer, padding_side):
    """Videos of different lengths and sizes beside images, padded: the stock model (which raises when the video
    tokens and features disagree) and dense VISOR read the processor's batch alike."""
    config = presets.tiny_qwen2_5_vl(num_layers=2)
    processor = VisorProcessor(config, tokenizer, padding_side=padding_side)
    videos = [_images([(30, 40)] * 3, seed=1), _images([(64, 100)] * 4, seed=2), _images([(90, 50)] * 1, seed=3)]
    batch = processor([Image.new("RGB", (50, 70), (200, 30, 30)), Image.new("RGB", (64, 64)), _images([(40, 90)])[0]],
                      ["what moves ?", "what is it ?", "how many ?"], videos=videos)
    _assert_dense_visor_reads_the_batch_as_stock(config, batch)


def _assert_dense_visor_reads_the_batch_as_stock(config, batch) -> None:
    """Dense VISOR's logits equal the stock model's on a padded batch, and the frames reach them (other pixels,
    other logits)."""
    from visor.backbones import backbone_for, family

    torch.manual_seed(0)
    stock = backbone_for(config).stock_model_class(config).eval()
    module = family(config)
    dense = module.VISOR_MODEL.from_stock(stock, module.VISOR_MODEL.config_class.dense(config)).eval()
    with torch.no_grad():
        expected, actual = stock(**batch).logits, dense(**batch).logits
    valid = batch["attention_mask"].bool()
    assert not valid.all()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=0)
    with torch.no_grad():
        changed = stock(**{**batch, "pixel_values_videos": batch["pixel_values_videos"].flip(0)}).logits
    assert not torch.allclose(changed[valid], expected[valid])


def test_qwen2_5_vl_bad_videos_give_clear_errors(tokenizer, tmp_path):
    from visor.data.frames import VideoSettings

    processor = _qwen_processor(tokenizer)
    with pytest.raises(ValueError, match="smaller than one 8x8 vision patch"):
        processor(None, "what ?", videos=[[Image.new("RGB", (5, 40))] * 2])
    with pytest.raises(ValueError, match="frames differ in size: 40x30, 50x30 px"):
        processor(None, "what ?", videos=[[Image.new("RGB", (40, 30)), Image.new("RGB", (50, 30))]])
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200"):
        processor(None, "what ?", videos=[[Image.new("RGB", (8, 2000))] * 2])
    messages = [{"role": "user", "content": "<video>\nwhat ? <video>\nthen"}]
    with pytest.raises(ValueError, match="has 2 video placeholders but 1 videos"):
        processor.conversations([[]], [messages], prompt_only=True, videos=[[_gif(tmp_path / "clip.gif", 2)]])
    with pytest.raises(ValueError, match="frames must be whole 16-pixel merged patches"):
        _qwen_processor(tokenizer, do_resize=False)(None, "what ?", videos=[[Image.new("RGB", (40, 32))] * 2])
    with pytest.raises(ValueError, match="Qwen2_5_VL videos take GridVideoSettings, got VideoSettings"):
        VisorProcessor(presets.tiny_qwen2_5_vl(), tokenizer, video_settings=VideoSettings(
            size=(64, 64), image_mean=(0.5,) * 3, image_std=(0.5,) * 3, num_frames=2))


def test_qwen2_5_vl_video_settings_survive_save_and_load(tokenizer, tmp_path):
    from visor.data.frames import load_grid_video_settings

    processor = _qwen_processor(tokenizer, min_pixels=4 * 256, max_pixels=32 * 256, num_frames=4,
                                image_mean=(0.4, 0.45, 0.5), resample=2)
    gif = _gif(tmp_path / "clip.gif", 9)
    batch = processor(None, "what ?", videos=gif)
    assert batch["video_grid_thw"][0, 0] == 2  # 4 of the 9 frames
    assert processor(None, "what ?", videos=gif, num_frames=7)["video_grid_thw"][0, 0] == 4
    processor.save_pretrained(tmp_path / "saved")
    saved = load_grid_video_settings(tmp_path / "saved", processor.backbone, processor.images.image_processor)
    assert saved == processor.videos.settings
    loaded = VisorProcessor.from_pretrained(tmp_path / "saved", config=processor.backbone.config, padding_side="left")
    assert loaded.videos.settings == processor.videos.settings
    again = loaded(None, "what ?", videos=gif)
    assert sorted(again) == sorted(batch) and all(torch.equal(again[key], batch[key]) for key in batch)
    every_frame = _qwen_processor(tokenizer)
    every_frame.save_pretrained(tmp_path / "every")
    reloaded = VisorProcessor.from_pretrained(tmp_path / "every", config=processor.backbone.config)
    assert reloaded.videos.settings == every_frame.videos.settings and reloaded.videos.settings.num_frames is None
    assert reloaded(None, "what ?", videos=gif)["video_grid_thw"][0, 0] == 5  # all 9 frames


# ---- Qwen3-VL videos ---------------------------------------------------------------------------------------------
def _qwen3_processor(tokenizer, padding_side="left", **settings):
    from visor.data.frames import TimedGridVideoSettings

    config = presets.tiny_qwen3_vl(num_layers=2)
    video_settings = None if not settings else TimedGridVideoSettings(**{
        "min_pixels": 4 * 256, "max_pixels": 4 * 64 * 256, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3,
        **settings})
    return VisorProcessor(config, tokenizer, padding_side=padding_side, video_settings=video_settings)


def _stock_qwen3_video_processor(settings):
    """The stock Qwen3-VL video processor with these settings: its sampling and its 3-D resize rule run without
    torchvision (its resizing and normalising do not)."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(
        patch_size=8, merge_size=2, temporal_patch_size=2, fps=settings.fps, min_frames=settings.min_frames,
        max_frames=settings.max_frames, size={"shortest_edge": settings.min_pixels,
                                              "longest_edge": settings.max_pixels})


@pytest.mark.parametrize("total", [1, 3, 7, 30, 47, 100])
def test_qwen3_vl_samples_frames_as_the_stock_video_processor(tokenizer, total):
    """By fps of frames taken as 24 a second (no timing), within min_frames … max_frames and the video's own count;
    a count the call gives instead (the stock processor's num_frames with no fps), at most the video's own count
    (the stock processor would repeat a shorter video's frames); every frame where the settings do not sample."""
    from transformers.video_utils import VideoMetadata

    processor = _qwen3_processor(tokenizer, max_frames=6)
    stock = _stock_qwen3_video_processor(processor.videos.settings)
    frames = _images([(16, 16)] * total, seed=total)
    for num_frames in (None, 5):
        clip = processor.videos.load(frames, num_frames)
        expected = stock.sample_frames(VideoMetadata(total_num_frames=total),
                                       num_frames=num_frames and min(num_frames, total),
                                       fps=None if num_frames else stock.fps).tolist()
        assert list(clip.indices) == expected and clip.frames == [frames[index] for index in expected]
    every = _qwen3_processor(tokenizer, do_sample_frames=False)
    assert every.videos.load(frames).indices == tuple(range(total))


def test_qwen3_vl_frames_are_the_stock_image_processor_s_pixels_in_temporal_patches(tokenizer):
    """Where the 3-D resize of a still clip gives the frame the stock PIL image processor gives it (the bounds
    scaled by the temporal patch), the clip's pixels are exactly the image processor's; a moving clip's frames
    take their temporal positions, the last one repeated to fill the last patch; the grid is the stock video
    processor's resize rule."""
    import dataclasses

    processor = _qwen3_processor(tokenizer, do_sample_frames=False)
    settings = processor.videos.settings
    frame_processor = dataclasses.replace(settings, min_pixels=settings.min_pixels // 2,
                                          max_pixels=settings.max_pixels // 2).frame_processor(processor.backbone)
    frames, stock, grid = _still_clip_is_the_stock_frame(processor, frame_processor)
    moving = processor(None, "what is it ?", videos=[frames[:4]])  # the bounds hold 4 frames unscaled, as 2
    per_patch = grid[1] * grid[2]
    pixels = _patches_by_frame(moving["pixel_values_videos"].numpy()).reshape(2, per_patch, 2, 3, 64)
    for index in range(4):
        expected = _patches_by_frame(stock[index]["pixel_values"])[:, 0]
        np.testing.assert_array_equal(pixels[index // 2, :, index % 2], expected)
    odd = processor(None, "what is it ?", videos=[frames])
    reference = _stock_qwen3_video_processor(settings)
    for batch, count in ((moving, 4), (odd, 5)):
        assert int(batch["video_grid_thw"].prod()) == reference.get_num_of_video_patches(count, 50, 120)
    last = _patches_by_frame(odd["pixel_values_videos"].numpy())
    last = last.reshape(3, -1, 2, 3, 64)[2]
    np.testing.assert_array_equal(last[:, 0], last[:, 1])  # the fifth frame fills the third temporal patch


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_qwen3_vl_video_prompts_give_dense_visor_the_stock_logits(tokenizer, padding_side):
    """Each temporal patch's tokens after its timestamp and between start and end tokens; videos of different
    lengths and sizes beside images, padded: the stock model (which raises when the video tokens and features
    disagree) and dense VISOR read the processor's batch alike, and the frames reach the answer."""
    from visor.data.frames import temporal_patch_times

    processor = _qwen3_processor(tokenizer, padding_side)
    config = processor.backbone.config
    videos = [_images([(30, 40)] * 30, seed=1), _images([(64, 100)] * 4, seed=2), _images([(90, 50)] * 3, seed=3)]
    batch = processor([Image.new("RGB", (50, 70), (200, 30, 30)), Image.new("RGB", (64, 64)), _images([(40, 90)])[0]],
                      ["what moves ?", "what is it ?", "how many ?"], videos=videos)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                          "video_grid_thw", "mm_token_type_ids"}
    assert batch["video_grid_thw"][:, 0].tolist() == [2, 2, 2]  # 4 of 30 frames; 4; 3 in 2 temporal patches
    for row, video, grid in zip(batch["input_ids"].tolist(), videos, batch["video_grid_thw"].tolist()):
        clip = processor.videos.load(video)
        expected = []
        for seconds in temporal_patch_times(clip.indices, 2):
            expected += tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"]
            expected += [presets.TINY_VISION_START_TOKEN_ID] + [config.video_token_id] * (grid[1] * grid[2] // 4)
            expected += [presets.TINY_VISION_END_TOKEN_ID]
        framed = [presets.TINY_VISION_START_TOKEN_ID, *expected, presets.TINY_VISION_END_TOKEN_ID]
        assert any(row[index:index + len(framed)] == framed for index in range(len(row)))
        assert row.count(config.video_token_id) == processor.videos.token_count(clip)
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == config.image_token_id).int()
                       + 2 * (batch["input_ids"] == config.video_token_id).int())
    _assert_dense_visor_reads_the_batch_as_stock(config, batch)


def test_qwen3_vl_bad_videos_give_clear_errors(tokenizer, tmp_path):
    from visor.data.frames import GridVideoSettings

    processor = _qwen3_processor(tokenizer)
    with pytest.raises(ValueError, match="Qwen3VL video needs at least 2 frames"):
        processor(None, "what ?", videos=[[Image.new("RGB", (40, 30))]])
    with pytest.raises(ValueError, match="frames differ in size: 40x30, 50x30 px"):
        processor(None, "what ?", videos=[[Image.new("RGB", (40, 30)), Image.new("RGB", (50, 30))]])
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200"):
        processor(None, "what ?", videos=[[Image.new("RGB", (8, 2000))] * 2])
    with pytest.raises(ValueError, match="num_frames must be positive"):
        processor(None, "what ?", videos=[[Image.new("RGB", (40, 30))] * 2], num_frames=-1)
    with pytest.raises(ValueError, match="frames must be whole 16-pixel merged patches"):
        _qwen3_processor(tokenizer, do_resize=False)(None, "what ?", videos=[[Image.new("RGB", (40, 32))] * 2])
    with pytest.raises(ValueError, match="Qwen3VL videos take TimedGridVideoSettings, got GridVideoSettings"):
        VisorProcessor(presets.tiny_qwen3_vl(), tokenizer, video_settings=GridVideoSettings(
            min_pixels=256, max_pixels=4096, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))


def test_qwen3_vl_video_settings_survive_save_and_load(tokenizer, tmp_path):
    from visor.data.frames import load_grid_video_settings, TimedGridVideoSettings

    gif = _gif(tmp_path / "clip.gif", 9)
    for index, settings in enumerate([dict(fps=None, num_frames=4, image_mean=(0.4, 0.45, 0.5), resample=2),
                                      dict(fps=48, min_frames=2, max_frames=6), dict(do_sample_frames=False)]):
        processor = _qwen3_processor(tokenizer, **settings)
        batch = processor(None, "what ?", videos=gif)
        folder = tmp_path / f"saved{index}"
        processor.save_pretrained(folder)
        saved = load_grid_video_settings(folder, processor.backbone, processor.images.image_processor,
                                         TimedGridVideoSettings)
        assert saved == processor.videos.settings
        loaded = VisorProcessor.from_pretrained(folder, config=processor.backbone.config, padding_side="left")
        assert loaded.videos.settings == processor.videos.settings
        again = loaded(None, "what ?", videos=gif)
        assert sorted(again) == sorted(batch) and all(torch.equal(again[key], batch[key]) for key in batch)
        assert batch["video_grid_thw"][0, 0] == [2, 3, 5][index]  # 4 frames; 6 (18 a second of 9); all 9
