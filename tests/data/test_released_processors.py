"""`VisorProcessor.from_pretrained` on folders laid out as each family's checkpoints are released equals the
family's stock processor byte for byte, and bad folders are refused naming the file and the field.

The stock `*Processor` classes need torchvision for their video half only; here each is built from the folder's
own pieces (its image processor from preprocessor_config.json, its tokenizer, its chat template, its
processor_config.json settings) with `video_processor=None` let through (`_image_only`), and its `__call__` and
`apply_chat_template` do the rest: the expansion rule, the tokenisation and the padding are the stock code's.
"""

from __future__ import annotations

import json
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer, BatchFeature, InternVLProcessor, LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor,
    Qwen3VLProcessor,
)

from transformers.video_utils import make_batched_metadata

from visor.backbones import backbone_for, checkpoint_config
from visor.data.frames import Clip, load_frames
from visor.data.processor import VisorProcessor, load_chat_template

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from released_checkpoints import FAMILIES, write_released_checkpoint  # noqa: E402

STOCK_PROCESSORS = {"llava-onevision": LlavaOnevisionProcessor, "qwen2-vl": Qwen2VLProcessor,
                    "qwen2.5-vl": Qwen2_5_VLProcessor, "qwen3-vl": Qwen3VLProcessor, "internvl3": InternVLProcessor}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {family: write_released_checkpoint(family, root / family) for family in FAMILIES}


def _image_only(processor_class):
    """The stock processor class, accepting `video_processor=None` (its video half needs torchvision)."""
    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)
    return ImageOnly


def stock_processor(family: str, folder: Path):
    config = checkpoint_config(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = backbone_for(config).image_processor_class.from_pretrained(folder)
    settings = {}
    if (folder / "processor_config.json").is_file():
        settings = {key: value for key, value in json.loads((folder / "processor_config.json").read_text()).items()
                    if key != "processor_class"}
    return _image_only(STOCK_PROCESSORS[family])(image_processor=image_processor, tokenizer=tokenizer,
                                                 video_processor=None,
                                                 chat_template=load_chat_template(folder, tokenizer), **settings)


def sample_images():
    """Six kinds of image: tiny, huge, portrait, panorama, grayscale and RGBA with transparency."""
    rng = np.random.default_rng(0)

    def noise(height, width, channels=3):
        return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)

    rgba = noise(90, 70, 4)
    rgba[:30, :, 3] = 0  # transparent rows, composited on white by both processors
    return {"tiny": Image.fromarray(noise(9, 12)), "huge": Image.fromarray(noise(2000, 3000)),
            "portrait": Image.fromarray(noise(300, 80)), "panorama": Image.fromarray(noise(60, 700)),
            "grayscale": Image.fromarray(noise(100, 100, 1)[..., 0], mode="L"),
            "rgba": Image.fromarray(rgba, mode="RGBA")}


def _messages(images: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}]


def _assert_same(ours, stock):
    assert sorted(ours) == sorted(stock), (sorted(ours), sorted(stock))
    for key in stock:
        assert ours[key].dtype == stock[key].dtype or key == "mm_token_type_ids", key
        assert torch.equal(ours[key].to(stock[key].dtype), stock[key]), key


def both_processors(folder: Path, family: str):
    """(the stock processor, VisorProcessor) of a released folder, left-padding batches."""
    return stock_processor(family, folder), VisorProcessor.from_pretrained(folder, padding_side="left")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_image_per_prompt_equals_the_stock_processor(released, family):
    stock, ours = both_processors(released[family], family)
    images = sample_images()
    for kind, image in images.items():  # one prompt at a time, as a generation call makes it
        messages = _messages(1, f"what color is the {kind} image ?")
        text = stock.apply_chat_template(messages, add_generation_prompt=True)
        expected = stock(images=[[image]], text=[text], return_tensors="pt")
        _assert_same(ours.conversations([[image]], [messages], prompt_only=True), expected)
    # and all six in one left-padded batch
    conversations = [_messages(1, "what is it ?") for _ in images]
    texts = [stock.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    expected = stock(images=[[image] for image in images.values()], text=texts, return_tensors="pt", padding=True,
                     padding_side="left")
    _assert_same(ours.conversations([[image] for image in images.values()], conversations, prompt_only=True),
                 expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_several_images_per_prompt_equal_the_stock_processor(released, family):
    stock, ours = both_processors(released[family], family)
    images = sample_images()
    rows = [[images["portrait"], images["rgba"]], [images["panorama"]], [images["tiny"], images["grayscale"],
                                                                          images["huge"]]]
    conversations = [_messages(len(row), "what changed between the images ?") for row in rows]
    texts = [stock.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    expected = stock(images=rows, text=texts, return_tensors="pt", padding=True, padding_side="left")
    _assert_same(ours.conversations(rows, conversations, prompt_only=True), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_llava_style_text_with_placeholders_renders_as_typed_parts(released, family):
    """LLaVA data's "<image>\\nquestion" and the question API ask exactly what typed parts ask."""
    ours = VisorProcessor.from_pretrained(released[family], padding_side="left")
    image = sample_images()["portrait"]
    typed = ours.conversations([[image]], [_messages(1, "what shape is it ?")], prompt_only=True)
    placeholder = ours.conversations([[image]], [[{"role": "user", "content": "<image>\nwhat shape is it ?"}]],
                                     prompt_only=True)
    asked = ours([image], ["what shape is it ?"])
    for batch in (placeholder, asked):
        assert torch.equal(batch["input_ids"], typed["input_ids"])


class FramesAsPrepared:
    """The stock processor's video half, which needs torchvision: here the frames `ours` prepares, so that the
    stock processor's own video-token expansion, rendering and padding are what is compared."""

    def __init__(self, ours):
        self.settings = ours.videos.settings

    def __call__(self, videos, **kwargs):
        pixels = np.stack([self.settings.pixels(video) for video in videos])
        return BatchFeature({"pixel_values_videos": torch.from_numpy(pixels)})


def test_video_prompts_equal_the_stock_processor(released, tmp_path):
    """LLaVA-OV's `<video>` expansion (the stock processor's formula; ours counts the model's features), in
    prompts with a video, with a video and an image, left-padded; a GIF, a folder and a list read alike."""
    folder = released["llava-onevision"]
    stock, ours = both_processors(folder, "llava-onevision")
    stock.video_processor = FramesAsPrepared(ours)
    images = sample_images()
    clip = [images[kind].convert("RGB").resize((70, 50)) for kind in ("portrait", "panorama", "tiny", "huge")]
    clip[0].save(tmp_path / "clip.gif", save_all=True, append_images=clip[1:], duration=100)
    rows = [[], [images["rgba"]], []]
    conversations = [[{"role": "user", "content": [{"type": "image"}] * len(row) + [{"type": "video"}, {
        "type": "text", "text": "what moves ?"}]}] for row in rows]
    texts = [stock.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    frames = ours.videos.load(tmp_path / "clip.gif").frames
    assert len(frames) == len(clip)
    expected = stock(images=[images["rgba"]], videos=[frames] * 3, text=texts, return_tensors="pt", padding=True,
                     padding_side="left")
    _assert_same(ours.conversations(rows, conversations, prompt_only=True, videos=[[tmp_path / "clip.gif"]] * 3),
                 expected)
    asked = ours([images["rgba"]], ["what moves ?"], videos=[clip])  # the question API asks the same
    assert torch.equal(asked["input_ids"][0], expected["input_ids"][1][expected["attention_mask"][1].bool()])


class GridFramesAsPrepared:
    """The Qwen2.5-VL stock processor's video half, which needs torchvision: the patches and grids `ours` prepares,
    with the metadata the stock video processor makes for frames given without any (`make_batched_metadata`), so
    that the stock processor's own seconds per temporal patch, video-token expansion, token types and padding are
    what is compared."""

    def __init__(self, ours):
        self.videos = ours.videos
        self.merge_size = ours.videos.frame_processor.merge_size
        self.temporal_patch_size = ours.videos.frame_processor.temporal_patch_size

    def __call__(self, videos, **kwargs):
        prepared = self.videos([[Clip.of(video) for video in videos]])
        metadata = make_batched_metadata([np.stack([np.asarray(frame) for frame in video]) for video in videos], None)
        return BatchFeature({"pixel_values_videos": prepared["pixel_values_videos"],
                             "video_grid_thw": prepared["video_grid_thw"], "video_metadata": metadata})


def test_qwen2_5_vl_video_prompts_equal_the_stock_processor(released, tmp_path):
    """Qwen2.5-VL's `<|video_pad|>` expansion (the grid's merged patches), its token types and seconds per temporal
    patch, with images, left-padded; the folder has no video config, so the frames get the image bounds."""
    folder = released["qwen2.5-vl"]
    stock, ours = both_processors(folder, "qwen2.5-vl")
    stock.video_processor = GridFramesAsPrepared(ours)
    images = sample_images()
    clip = [images[kind].convert("RGB").resize((70, 50)) for kind in ("portrait", "panorama", "tiny")]
    clip[0].save(tmp_path / "clip.gif", save_all=True, append_images=clip[1:], duration=100)
    still = [images["portrait"].resize((120, 40))] * 2
    rows, clips = [[], [images["rgba"]], []], [[tmp_path / "clip.gif"], [still], [still, tmp_path / "clip.gif"]]
    conversations = [[{"role": "user", "content": [{"type": "image"}] * len(row) + [{"type": "video"}] * len(videos)
                       + [{"type": "text", "text": "what moves ?"}]}] for row, videos in zip(rows, clips)]
    texts = [stock.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    frames = [ours.videos.load(video).frames for row in clips for video in row]
    assert [len(video) for video in frames] == [3, 2, 2, 3]  # every frame: the folder's settings do not sample
    expected = stock(images=[images["rgba"]], videos=frames, text=texts, return_tensors="pt", padding=True,
                     padding_side="left")
    assert "second_per_grid_ts" in expected and int((expected["mm_token_type_ids"] == 2).sum()) > 0
    _assert_same(ours.conversations(rows, conversations, prompt_only=True, videos=clips), expected)
    asked = ours(None, ["what moves ?"], videos=[tmp_path / "clip.gif"])  # the question API asks the same
    assert torch.equal(asked["input_ids"][0], expected["input_ids"][0][expected["attention_mask"][0].bool()])


class TimedFramesAsPrepared:
    """The Qwen3-VL stock processor's video half, which needs torchvision to resize and normalise: the folder's stock
    `Qwen3VLVideoProcessor` samples the frames (its own `_decode_and_sample_videos`, with the metadata it makes for
    frames given without any), and `ours` prepares the frames it keeps, so that the stock sampling, timestamps,
    video-token expansion, token types and padding are what is compared."""

    def __init__(self, ours, folder):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        self.videos = ours.videos
        self.stock = Qwen3VLVideoProcessor.from_pretrained(folder)
        self.merge_size, self.temporal_patch_size = self.stock.merge_size, self.stock.temporal_patch_size

    def __call__(self, videos, **kwargs):
        sample = partial(self.stock.sample_frames, num_frames=self.stock.num_frames, fps=self.stock.fps)
        sampled, metadata = self.stock._decode_and_sample_videos(videos, video_metadata=None, do_sample_frames=True,
                                                                 sample_indices_fn=sample)
        clips = [Clip([Image.fromarray(frame) for frame in video], tuple(entry.frames_indices.tolist()))
                 for video, entry in zip(sampled, metadata)]
        prepared = self.videos([clips])
        return BatchFeature({"pixel_values_videos": prepared["pixel_values_videos"],
                             "video_grid_thw": prepared["video_grid_thw"], "video_metadata": metadata})


def test_qwen3_vl_video_prompts_equal_the_stock_processor(released, tmp_path):
    """Qwen3-VL's video prompts: the frames the stock video processor samples (2 a second of untimed frames, at
    least 4, at most the video's), each temporal patch after its timestamp between its own start and end tokens,
    token types, with images, left-padded; the grids are the stock video processor's 3-D resize of the frames."""
    folder = released["qwen3-vl"]
    stock, ours = both_processors(folder, "qwen3-vl")
    stock.video_processor = TimedFramesAsPrepared(ours, folder)
    images = sample_images()
    clip = [images[kind].convert("RGB").resize((70, 50)) for kind in ("portrait", "panorama", "tiny")]
    clip[0].save(tmp_path / "clip.gif", save_all=True, append_images=clip[1:], duration=100)
    rng = np.random.default_rng(1)
    long = [Image.fromarray(rng.integers(0, 256, size=(30, 90, 3), dtype=np.uint8)) for _ in range(50)]
    rows, clips = [[], [images["rgba"]], []], [[tmp_path / "clip.gif"], [long], [long[:20], tmp_path / "clip.gif"]]
    conversations = [[{"role": "user", "content": [{"type": "image"}] * len(row) + [{"type": "video"}] * len(videos)
                       + [{"type": "text", "text": "what moves ?"}]}] for row, videos in zip(rows, clips)]
    texts = [stock.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    frames = [load_frames(video) for row in clips for video in row]
    expected = stock(images=[images["rgba"]], videos=frames, text=texts, return_tensors="pt", padding=True,
                     padding_side="left")
    assert "seconds>" in stock.tokenizer.decode(expected["input_ids"][1])
    assert [len(ours.videos.load(video)) for video in frames] == [3, 4, 4, 3]
    _assert_same(ours.conversations(rows, conversations, prompt_only=True, videos=clips), expected)
    for video, grid in zip(frames, expected["video_grid_thw"].tolist()):
        kept = len(ours.videos.load(video))
        assert stock.video_processor.stock.get_num_of_video_patches(kept, video[0].height, video[0].width) == (
            grid[0] * grid[1] * grid[2])
    asked = ours(None, ["what moves ?"], videos=[tmp_path / "clip.gif"])  # the question API asks the same
    assert torch.equal(asked["input_ids"][0], expected["input_ids"][0][expected["attention_mask"][0].bool()])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_labels_cover_the_answers_of_the_stock_rendering(released, family):
    """The labelled conversation is the stock rendering of the whole conversation (its image tokens expanded):
    labels are exactly the assistant turns' tokens, ending with the template's end-of-turn token."""
    folder = released[family]
    stock = stock_processor(family, folder)
    ours = VisorProcessor.from_pretrained(folder)
    image = sample_images()["panorama"]
    messages = _messages(1, "what color ?") + [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    batch = ours.conversations([[image]], [messages])
    text = stock.apply_chat_template(messages)
    full = stock(images=[[image]], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert full[:len(ids)] == ids and all(token in (stock.tokenizer.encode("\n")) for token in full[len(ids):])
    answered = [token for token in labels if token != -100]
    assert ours.tokenizer.decode(answered) == "red<|im_end|>"


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def _edit_json(path: Path, **changes):
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, **changes}))


def test_tokenizer_without_the_configs_image_token_is_refused(released, tmp_path):
    folder = _copy(released["qwen2.5-vl"], tmp_path)
    _edit_json(folder / "config.json", image_token_id=200)  # an ordinary word piece, not a special token
    with pytest.raises(ValueError, match=f"{folder}'s tokenizer has no special token with the id 200"):
        VisorProcessor.from_pretrained(folder)


def test_processor_config_of_another_family_is_refused(released, tmp_path):
    folder = _copy(released["qwen2.5-vl"], tmp_path)
    shutil.copyfile(released["llava-onevision"] / "preprocessor_config.json", folder / "preprocessor_config.json")
    with pytest.raises(ValueError, match="preprocessor_config.json: image_processor_type is "
                                         "'LlavaOnevisionImageProcessor'"):
        VisorProcessor.from_pretrained(folder)


@pytest.mark.parametrize("field,value", [("image_mean", [0.5, 0.5]), ("image_std", [0.2, 0.2, 0.2, 0.2]),
                                         ("image_mean", "0.5")])
def test_mean_and_std_of_the_wrong_length_are_refused(released, tmp_path, field, value):
    folder = _copy(released["llava-onevision"], tmp_path)
    _edit_json(folder / "preprocessor_config.json", **{field: value})
    with pytest.raises(ValueError, match=f"preprocessor_config.json: {field} must be 3 numbers"):
        VisorProcessor.from_pretrained(folder)


@pytest.mark.parametrize("family,field,value", [("qwen3-vl", "patch_size", 14), ("llava-onevision", "size",
                                                                                  {"height": 96, "width": 96})])
def test_settings_the_model_cannot_read_are_refused(released, tmp_path, family, field, value):
    folder = _copy(released[family], tmp_path)
    _edit_json(folder / "preprocessor_config.json", **{field: value})
    with pytest.raises(ValueError, match=f"preprocessor_config.json: {field} is .* but the model config expects"):
        VisorProcessor.from_pretrained(folder)


def test_a_folder_without_processor_config_gets_the_family_defaults_and_says_so(released, tmp_path, caplog):
    folder = _copy(released["qwen2.5-vl"], tmp_path)
    (folder / "preprocessor_config.json").unlink()
    with caplog.at_level("WARNING"):
        processor = VisorProcessor.from_pretrained(folder)
    assert "has no preprocessor_config.json" in caplog.text and "0.48145466" in caplog.text
    assert list(processor.images.image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]


def test_an_internvl_folder_without_processor_config_gets_the_released_tiling_and_says_so(released, tmp_path, caplog):
    folder = _copy(released["internvl3"], tmp_path)
    (folder / "preprocessor_config.json").unlink()
    with caplog.at_level("WARNING"):
        ours = VisorProcessor.from_pretrained(folder, padding_side="left")
    assert "has no preprocessor_config.json" in caplog.text and "0.485" in caplog.text
    stock = stock_processor("internvl3", released["internvl3"])
    image = sample_images()["panorama"]
    messages = _messages(1, "what is it ?")
    expected = stock(images=[[image]], text=[stock.apply_chat_template(messages, add_generation_prompt=True)],
                     return_tensors="pt")
    _assert_same(ours.conversations([[image]], [messages], prompt_only=True), expected)


def test_an_internvl_tile_size_the_model_cannot_read_is_refused(released, tmp_path):
    folder = _copy(released["internvl3"], tmp_path)
    _edit_json(folder / "preprocessor_config.json", size={"height": 448, "width": 448})
    with pytest.raises(ValueError, match="preprocessor_config.json: size is .* but the model config expects"):
        VisorProcessor.from_pretrained(folder)
