"""Video frames read with Pillow (GIF, WebP, a folder, a list), sampled uniformly, prepared as the stock processors
prepare a crop; Qwen3-VL's timestamps and settings; bad videos and broken settings are named."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from visor import presets
from visor.backbones import backbone_for
from visor.data.frames import (
    GridVideoSettings, TimedGridVideoSettings, VideoSettings, load_frames, load_grid_video_settings,
    load_video_settings, sampled_frame_indices, temporal_patch_times,
)

COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250)]


def coloured_frames(size=(40, 30)) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for colour in COLOURS]


def centre_colour(frame: Image.Image) -> tuple[int, ...]:
    return frame.getpixel((frame.width // 2, frame.height // 2))


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_an_animation_gives_its_frames_in_order(tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    first, *rest = coloured_frames()
    options = dict(lossless=True) if suffix == ".webp" else {}
    first.save(path, save_all=True, append_images=rest, duration=100, loop=0, **options)
    frames = load_frames(path)
    assert len(frames) == len(COLOURS) and all(frame.mode == "RGB" and frame.size == (40, 30) for frame in frames)
    for frame, colour in zip(frames, COLOURS):
        assert np.abs(np.subtract(centre_colour(frame), colour)).max() <= 8  # GIF's palette rounds a little


def test_a_folder_gives_its_frame_images_in_name_order(tmp_path):
    for index, frame in reversed(list(enumerate(coloured_frames()))):
        frame.save(tmp_path / f"frame_{index:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    assert [centre_colour(frame) for frame in load_frames(tmp_path)] == COLOURS


def test_a_list_of_frames_takes_images_arrays_and_paths(tmp_path):
    frames = coloured_frames()
    frames[1].save(tmp_path / "one.png")
    mixed = [frames[0], tmp_path / "one.png", np.asarray(frames[2]), str(tmp_path / "one.png")]
    assert [centre_colour(frame) for frame in load_frames(mixed)] == [COLOURS[0], COLOURS[1], COLOURS[2], COLOURS[1]]


def test_bad_videos_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    coloured_frames()[0].save(broken / "a.png")
    (broken / "b.png").write_bytes(b"not a png")
    still = tmp_path / "still.png"
    coloured_frames()[0].save(still)
    cases = [
        ([], "video holds no frames"),
        (tmp_path / "empty", "empty holds no frames"),
        (broken, "b.png is not an image file Pillow can read"),
        ([coloured_frames()[0], coloured_frames((30, 40))[1]], "frames differ in size: 30x40, 40x30 px"),
        (still, "is not a folder of frames or an animated GIF / WebP"),
        (tmp_path / "missing.gif", "missing.gif does not exist"),
        (coloured_frames()[0], "a video is a list of frames.* got Image"),
        ([coloured_frames()[0], 7], "expected a PIL image, a path or a uint8 array, got int"),
    ]
    for video, message in cases:
        with pytest.raises(ValueError, match=message):
            load_frames(video)
    with pytest.raises(ValueError, match="smaller than one 8x8 vision patch"):
        load_frames([Image.new("RGB", (5, 5))], min_side=8)


def test_sampling_spreads_the_frames_evenly():
    assert sampled_frame_indices(10, 4) == [0, 2, 5, 7]
    assert sampled_frame_indices(10, 10) == list(range(10)) and sampled_frame_indices(3, 8) == [0, 1, 2]
    assert sampled_frame_indices(5, None) == list(range(5))  # no count: every frame
    with pytest.raises(ValueError, match="num_frames must be positive"):
        sampled_frame_indices(10, 0)


@pytest.fixture(scope="module")
def backbone():
    return backbone_for(presets.tiny(2))


def test_a_frame_is_prepared_as_the_stock_image_processor_prepares_its_base_view(backbone):
    """With the image settings (the defaults without a video config), a frame is exactly the stock PIL image
    processor's first crop of that image: the whole image resized to the crop, rescaled and normalised."""
    image_processor = backbone.default_image_processor()
    settings = load_video_settings(None, backbone, image_processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(50, 120, 3), dtype=np.uint8))
    expected = image_processor([image], return_tensors="np")["pixel_values"][0][0]
    pixels = settings.pixels([image, image])
    assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[1], expected, atol=1e-6, rtol=0)


def test_a_video_config_is_read_and_checked(tmp_path, backbone, caplog):
    image_processor = backbone.default_image_processor()
    with caplog.at_level(logging.WARNING):
        defaults = load_video_settings(tmp_path, backbone, image_processor)
    assert "has no video_preprocessor_config.json" in caplog.text
    assert defaults == VideoSettings(size=(64, 64), image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                     num_frames=backbone.default_video_frames)
    config = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 64, "width": 64},
              "image_mean": [0.4, 0.45, 0.5], "image_std": [0.2, 0.25, 0.3], "num_frames": 6, "resample": 2}
    path = tmp_path / "video_preprocessor_config.json"
    path.write_text(json.dumps(config))
    settings = load_video_settings(tmp_path, backbone, image_processor)
    assert (settings.image_mean, settings.image_std, settings.num_frames, settings.resample) == (
        (0.4, 0.45, 0.5), (0.2, 0.25, 0.3), 6, 2)
    broken = [
        ({"video_processor_type": "Qwen2VLVideoProcessor"}, "processed by LlavaOnevisionVideoProcessor"),
        ({"size": {"height": 32, "width": 32}}, r"vision tower takes 64x64 frames"),
        ({"size": {"shortest_edge": 64}}, "size must be"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be 3 numbers"),
        ({"num_frames": 0}, "num_frames must be a positive integer"),
        ({"fps": 1, "num_frames": None}, "sampling by fps needs frame times"),
    ]
    for fields, message in broken:
        path.write_text(json.dumps({**config, **fields}))
        with pytest.raises(ValueError, match=message):
            load_video_settings(tmp_path, backbone, image_processor)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_video_settings(tmp_path, backbone, image_processor)


def test_a_qwen_video_config_is_read_over_the_stock_defaults_and_checked(tmp_path, caplog):
    """Without a video config, the image processor's settings (as the stock processor then reads the image config),
    every frame; with one, its fields over the stock video processor's defaults, frames kept unless it samples."""
    backbone = backbone_for(presets.tiny_qwen2_5_vl(2))
    image_processor = backbone.image_processor_class(min_pixels=1024, max_pixels=4096, image_mean=[0.5] * 3,
                                                     image_std=[0.25] * 3)
    with caplog.at_level(logging.WARNING):
        defaults = load_grid_video_settings(tmp_path, backbone, image_processor)
    assert "has no video_preprocessor_config.json" in caplog.text and "every frame kept" in caplog.text
    assert defaults == GridVideoSettings(min_pixels=1024, max_pixels=4096, image_mean=(0.5,) * 3,
                                         image_std=(0.25,) * 3)
    path = tmp_path / "video_preprocessor_config.json"
    path.write_text(json.dumps({"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 8}))
    assert load_grid_video_settings(tmp_path, backbone, image_processor) == GridVideoSettings(
        min_pixels=backbone.min_frame_pixels, max_pixels=backbone.max_frame_pixels,
        image_mean=tuple(backbone.image_mean), image_std=tuple(backbone.image_std))
    config = {"size": {"shortest_edge": 512, "longest_edge": 8192}, "do_sample_frames": True, "num_frames": 6,
              "image_mean": [0.4, 0.45, 0.5], "resample": 2}
    path.write_text(json.dumps(config))
    settings = load_grid_video_settings(tmp_path, backbone, image_processor)
    assert (settings.min_pixels, settings.max_pixels, settings.num_frames, settings.image_mean, settings.resample) == (
        512, 8192, 6, (0.4, 0.45, 0.5), 2)
    path.write_text(json.dumps({**config, "do_sample_frames": False, "min_pixels": 256, "max_pixels": 2048}))
    settings = load_grid_video_settings(tmp_path, backbone, image_processor)
    assert (settings.min_pixels, settings.max_pixels, settings.num_frames) == (256, 2048, None)
    broken = [
        ({"video_processor_type": "LlavaOnevisionVideoProcessor"}, "processed by Qwen2VLVideoProcessor"),
        ({"patch_size": 14}, "patch_size is 14, but the model config expects 8"),
        ({"temporal_patch_size": 1}, "temporal_patch_size is 1, but the model config expects 2"),
        ({"size": {"height": 64, "width": 64}}, "size must be {'shortest_edge'"),
        ({"image_std": [0.5]}, "image_std must be 3 numbers"),
        ({"num_frames": 0}, "num_frames must be a positive integer"),
        ({"fps": 2, "num_frames": None}, "sampling by fps needs frame times"),
        ({"cap_pixels_per_frame": True}, "cap_pixels_per_frame .* is not supported"),
    ]
    for fields, message in broken:
        path.write_text(json.dumps({**config, **fields}))
        with pytest.raises(ValueError, match=message):
            load_grid_video_settings(tmp_path, backbone, image_processor)


def test_temporal_patch_times_are_the_stock_qwen3_vl_timestamps():
    """The mean time of each temporal patch's first and last frame, the last frame repeated to fill the last patch:
    the stock processor's own computation, float for float (its text rounds them to one decimal)."""
    from transformers import Qwen3VLProcessor

    rng = np.random.default_rng(0)
    for count in (1, 2, 3, 8, 15):
        indices = sorted(rng.integers(0, 500, size=count).tolist())
        for fps in (24, 2.5):
            expected = Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
            assert temporal_patch_times(indices, 2, fps) == expected
    assert temporal_patch_times([0, 12, 24], 2) == [0.25, 1.0]


def test_a_qwen3_video_config_is_read_over_the_stock_defaults_and_checked(tmp_path, caplog):
    """Without a video config, the image processor's pixel bounds and normalisation, sampled as the stock video
    processor samples by default (2 a second, 4 to 768 frames); with one, its fields over the stock defaults."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    backbone = backbone_for(presets.tiny_qwen3_vl(2))
    image_processor = backbone.image_processor_class(min_pixels=1024, max_pixels=4096, image_mean=[0.5] * 3,
                                                     image_std=[0.25] * 3)
    with caplog.at_level(logging.WARNING):
        defaults = load_grid_video_settings(tmp_path, backbone, image_processor, TimedGridVideoSettings)
    assert "has no video_preprocessor_config.json" in caplog.text and "2 frames a second" in caplog.text
    assert defaults == TimedGridVideoSettings(min_pixels=1024, max_pixels=4096, image_mean=(0.5,) * 3,
                                              image_std=(0.25,) * 3)
    assert (defaults.fps, defaults.min_frames, defaults.max_frames, defaults.do_sample_frames) == (
        Qwen3VLVideoProcessor.fps, Qwen3VLVideoProcessor.min_frames, Qwen3VLVideoProcessor.max_frames, True)
    path = tmp_path / "video_preprocessor_config.json"
    path.write_text(json.dumps({"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 8}))
    assert load_grid_video_settings(tmp_path, backbone, image_processor, TimedGridVideoSettings) == (
        TimedGridVideoSettings(min_pixels=Qwen3VLVideoProcessor.size["shortest_edge"],
                               max_pixels=Qwen3VLVideoProcessor.size["longest_edge"], image_mean=(0.5,) * 3,
                               image_std=(0.5,) * 3))
    config = {"size": {"shortest_edge": 512, "longest_edge": 8192}, "fps": 1, "min_frames": 2, "max_frames": 16}
    path.write_text(json.dumps(config))
    settings = load_grid_video_settings(tmp_path, backbone, image_processor, TimedGridVideoSettings)
    assert (settings.min_pixels, settings.max_pixels, settings.fps, settings.min_frames, settings.max_frames) == (
        512, 8192, 1, 2, 16)
    path.write_text(json.dumps({**config, "fps": None, "num_frames": 6}))
    assert load_grid_video_settings(tmp_path, backbone, image_processor, TimedGridVideoSettings).num_frames == 6
    broken = [
        ({"video_processor_type": "Qwen2VLVideoProcessor"}, "processed by Qwen3VLVideoProcessor"),
        ({"patch_size": 14}, "patch_size is 14, but the model config expects 8"),
        ({"num_frames": 6}, "num_frames and fps are mutually exclusive"),
        ({"fps": None, "num_frames": 0}, "num_frames must be a positive integer"),
        ({"fps": -1}, "fps must be a positive number or null"),
        ({"max_frames": 0}, "max_frames must be a positive integer"),
        ({"cap_pixels_per_frame": True}, "cap_pixels_per_frame .* is not supported"),
    ]
    for fields, message in broken:
        path.write_text(json.dumps({**config, **fields}))
        with pytest.raises(ValueError, match=message):
            load_grid_video_settings(tmp_path, backbone, image_processor, TimedGridVideoSettings)
