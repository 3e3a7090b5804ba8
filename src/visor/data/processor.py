"""(image, question[, answer]) -> model inputs for a supported model family, configured from the model config.

Pixels come from transformers' own PIL image processors (no torchvision needed): `LlavaOnevisionImageProcessorPil`
(anyres crops, `image_sizes`) or, for the Qwen-VL families, `Qwen2VLImageProcessorPil` (flattened patches,
`image_grid_thw`). The families' full processors cannot be built without torchvision, so the `<image>` expansion
is done here: the prompt is rendered with the tokenizer's chat template around a single `<image>`, which is
replaced by as many `<image>` ids as the backbone adapter says the model will fill for that image size (for
Qwen-VL between its vision start and end tokens, as its processor writes them).

Training rows: `labels` are -100 except on the answer tokens and the end-of-sequence token after them. Pass
per-pixel `class_maps` to also get `patch_targets` (batch, max_crops, patches per crop), aligned with
`pixel_values`' crops, -100 where there is no target.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from transformers import BatchFeature, LlavaOnevisionImageProcessorPil, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from visor.backbones import backbone_for
from visor.data.crops import CropLayout
from visor.data.render import IGNORE_INDEX

# SigLIP's normalisation, as LLaVA-OneVision's released preprocessor configs use.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGE_TOKEN = "<image>"
# Decoding is bounded: a header may claim any size (a "decompression bomb"); every processor downscales far below.
MAX_IMAGE_PIXELS = 64_000_000

ImageLike = Image.Image | str | Path | np.ndarray


def load_image(image: ImageLike, min_side: int = 1) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path or an (H, W[, C]) uint8 array; ValueError on bad input.

    Transparent images are composited on white (not on black, which a plain RGB conversion would give);
    grayscale, palette and 16-bit images are converted to RGB.
    """
    source = "image"
    if isinstance(image, (str, Path)):
        source = str(image)
        if not Path(image).is_file():
            raise ValueError(f"image file {source} does not exist")
        try:
            image = Image.open(image)
        except UnidentifiedImageError as error:
            raise ValueError(f"{source} is not an image file Pillow can read") from error
        except Image.DecompressionBombError as error:
            raise ValueError(f"{source} is too large to decode: {error}") from error
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"image arrays must be (H, W) or (H, W, C) uint8, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, a path or a uint8 array, got {type(image).__name__}")
    if image.width * image.height > MAX_IMAGE_PIXELS:  # checked on the header, before decoding
        raise ValueError(f"{source} is {image.width}x{image.height} px, more than the {MAX_IMAGE_PIXELS:,} pixels "
                         "an image may have; downscale it first")
    try:
        with _strict_decoding():
            image.load()
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{source} is truncated or corrupt: {error}") from error
    if image.mode in ("I", "I;16", "I;16B", "F"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((values * (255.0 / max(values.max(), 1.0))).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    if min(image.size) < min_side:
        raise ValueError(
            f"{source} is {image.width}x{image.height} px, smaller than one {min_side}x{min_side} vision patch"
        )
    return image


class AnyresImages:
    """LLaVA-OneVision's image inputs: anyres crops of the config's crop size, and patch targets per crop."""

    has_patch_targets = True

    def __init__(self, backbone, image_mean, image_std):
        self.layout = CropLayout.from_config(backbone.config)
        self.min_side = self.layout.patch
        crop = {"height": self.layout.crop, "width": self.layout.crop}
        self.image_processor = LlavaOnevisionImageProcessorPil(
            size=crop, crop_size=crop, image_grid_pinpoints=[list(p) for p in self.layout.pinpoints],
            image_mean=list(image_mean), image_std=list(image_std),
        )

    def placeholder(self, image_token_id: int, count: int) -> list[int]:
        return [image_token_id] * count

    def __call__(self, images: list[Image.Image]) -> dict:
        pixels = self.image_processor(images, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}

    def prompt_inputs(self, input_ids: torch.Tensor, image_token_id: int) -> dict:
        return {}

    def patch_targets(self, images: list[Image.Image], class_maps: list[np.ndarray], inputs: dict) -> torch.Tensor:
        """(batch, max_crops, patches per crop) class ids aligned with `pixel_values`' crops, -100 where none."""
        max_crops = inputs["pixel_values"].shape[1]
        out = torch.full((len(images), max_crops, self.layout.side**2), IGNORE_INDEX, dtype=torch.long)
        for i, (image, class_map) in enumerate(zip(images, class_maps)):
            if class_map is None:  # an image without targets (e.g. a real photo in a mixed batch)
                continue
            if class_map.shape != (image.height, image.width):
                raise ValueError(f"class map {i} is {class_map.shape}, its image is {(image.height, image.width)}")
            targets = self.layout.patch_targets(class_map)
            out[i, : len(targets)] = torch.from_numpy(targets)
        return out


class GridImages:
    """The Qwen-VL families' image inputs: each image resized to whole merged patches and flattened into patches,
    with its (t, h, w) patch grid; its tokens sit between the vision start and end tokens."""

    has_patch_targets = False

    def __init__(self, backbone, image_mean, image_std):
        config = backbone.config
        vision = config.vision_config
        self.min_side = vision.patch_size
        self.start, self.end = config.vision_start_token_id, config.vision_end_token_id
        self.image_processor = Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size, min_pixels=backbone.min_pixels,
            max_pixels=backbone.max_pixels, image_mean=list(image_mean), image_std=list(image_std),
        )

    def placeholder(self, image_token_id: int, count: int) -> list[int]:
        return [self.start] + [image_token_id] * count + [self.end]

    def __call__(self, images: list[Image.Image]) -> dict:
        pixels = self.image_processor(images, return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}

    def prompt_inputs(self, input_ids: torch.Tensor, image_token_id: int) -> dict:
        """The token types (1 at image tokens) that the stock models compute their positions from."""
        return {"mm_token_type_ids": (input_ids == image_token_id).int()}

    def patch_targets(self, images, class_maps, inputs):
        raise ValueError("patch targets (class_maps) follow LLaVA-OneVision's crops; this model family has none")


class VisorProcessor:
    """Turns images and questions (and answers, for training) into inputs of `config`'s family that agree with it."""

    def __init__(self, config, tokenizer: PreTrainedTokenizerBase,
                 padding_side: str = "right", image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' (generation) or 'right' (training), got {padding_side!r}")
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id != config.image_token_id:
            raise ValueError(
                f"the tokenizer's {IMAGE_TOKEN} id is {image_token_id} but the model config expects "
                f"{config.image_token_id}; set config.image_token_id (and resize embeddings) to match"
            )
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and an end-of-sequence token")
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template to render prompts with")
        self.backbone = backbone_for(config)
        self.images = (GridImages if "image_grid_thw" in self.backbone.image_inputs else AnyresImages)(
            self.backbone, image_mean, image_std)
        self.tokenizer = tokenizer
        self.padding_side = padding_side
        self.image_token_id = image_token_id

    def __call__(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str],
                 answers: str | Sequence[str] | None = None,
                 class_maps: np.ndarray | Sequence[np.ndarray] | None = None) -> BatchFeature:
        """A padded batch: input_ids, attention_mask and the family's image inputs (LLaVA-OV: pixel_values
        (B, max_crops, 3, crop, crop) and image_sizes; Qwen-VL: pixel_values (patches, features), image_grid_thw
        and mm_token_type_ids), plus labels when `answers` are given and patch_targets when `class_maps` are. A
        single image and question make a batch of one."""
        images = _as_list(images, (Image.Image, str, Path, np.ndarray))
        questions = _as_list(questions, str)
        answers = None if answers is None else _as_list(answers, str)
        class_maps = None if class_maps is None else _as_list(class_maps, np.ndarray)  # entries may be None
        if not images:
            raise ValueError("the batch is empty")
        for name, values in (("questions", questions), ("answers", answers), ("class_maps", class_maps)):
            if values is not None and len(values) != len(images):
                raise ValueError(f"got {len(images)} images but {len(values)} {name}")
        conversations = []
        for row, question in enumerate(questions):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"questions must be non-empty text, got {question!r}")
            if IMAGE_TOKEN in question:
                raise ValueError(f"questions must not contain {IMAGE_TOKEN}; the processor places the image")
            messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question.strip()}"}]
            if answers is not None:
                if not isinstance(answers[row], str) or not answers[row].strip():
                    raise ValueError(f"answers must be non-empty text, got {answers[row]!r}")
                messages.append({"role": "assistant", "content": answers[row].strip()})
            conversations.append(messages)
        return self.conversations([[image] for image in images], conversations, prompt_only=answers is None,
                                  class_maps=class_maps)

    def conversations(self, images: Sequence[Sequence[ImageLike]], conversations: Sequence[Sequence[dict]],
                      prompt_only: bool = False, max_length: int | None = None,
                      class_maps: Sequence[np.ndarray | None] | None = None) -> BatchFeature:
        """A padded batch of chat conversations, each with its images in the order of its `<image>` placeholders.

        Messages are `{"role": "system" | "user" | "assistant", "content": text}`. Training rows (`prompt_only`
        False) are labelled on every assistant turn (its text and the end-of-sequence token; -100 elsewhere).
        `prompt_only`: the prompt that asks for the *last* assistant turn (left out), for generation.
        `max_length` cuts a longer row from its end; a cut into an image's tokens is a ValueError.
        """
        if len(images) != len(conversations):
            raise ValueError(f"got {len(images)} image lists but {len(conversations)} conversations")
        if not conversations:
            raise ValueError("the batch is empty")
        loaded = [[load_image(image, min_side=self.images.min_side) for image in row] for row in images]
        sequences, label_rows = [], []
        for row, (row_images, messages) in enumerate(zip(loaded, conversations)):
            ids, labels = self._conversation_ids(messages, prompt_only)
            ids, labels, images_end = self._expand_images(ids, labels, row_images, row)
            if max_length is not None and len(ids) > max_length:
                if images_end > max_length:
                    raise ValueError(f"conversation {row} needs {len(ids)} tokens and its images end at token "
                                     f"{images_end}, after max_length {max_length}: raise it or use smaller images")
                ids, labels = ids[:max_length], labels[:max_length]
            sequences.append(ids)
            label_rows.append(labels)

        flat = [image for row in loaded for image in row]
        batch = {
            "input_ids": self._pad(sequences, self.tokenizer.pad_token_id),
            "attention_mask": self._pad([[1] * len(ids) for ids in sequences], 0),
            **(self.images(flat) if flat else {}),
        }
        batch |= self.images.prompt_inputs(batch["input_ids"], self.image_token_id)
        if not prompt_only:
            batch["labels"] = self._pad(label_rows, IGNORE_INDEX)
        if class_maps is not None:
            batch["patch_targets"] = self.images.patch_targets(flat, class_maps, batch)
        return BatchFeature(batch)

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _conversation_ids(self, messages: Sequence[dict], prompt_only: bool) -> tuple[list[int], list[int]]:
        """Ids (one `<image>` id per image) and labels of a conversation, rendered by the chat template turn by
        turn: each assistant turn is what the template adds to the conversation before it, closed by the
        end-of-sequence token where the template does not write one (the model must learn to stop)."""
        if prompt_only and messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # the reference answer, left for the model to give
        answers = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
        if not prompt_only and not answers:
            raise ValueError("a training conversation needs an assistant turn")
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for turn in answers:
            context = self._render(messages[:turn], generation_prompt=True)
            answered = self._render(messages[:turn + 1], generation_prompt=False)
            prompt, answer = self._continuation(rendered, context), self._continuation(context, answered)
            after = []  # template text after the end-of-sequence token (a newline, say): context, not answer
            if eos in answer:
                answer, after = answer[:answer.index(eos) + 1], answer[answer.index(eos) + 1:]
            else:
                answer = answer + [eos]
            if turn == len(messages) - 1:
                after = []  # nothing follows the conversation's last answer
            ids += prompt + answer + after
            labels += [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * len(after)
            rendered = answered
        if prompt_only:
            prompt = self._continuation(rendered, self._render(messages, generation_prompt=True))
            ids += prompt
            labels += [IGNORE_INDEX] * len(prompt)
        return ids, labels

    def _continuation(self, before: str, text: str) -> list[int]:
        """Token ids of what `text` adds to `before`, which must be its beginning."""
        if not text.startswith(before):
            raise ValueError("the chat template does not render this conversation turn by turn (a later turn "
                             "changes the text of an earlier one), so its turns cannot be labelled")
        rest = text[len(before):]
        return self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []

    def _expand_images(self, ids: list[int], labels: list[int], images: list[Image.Image],
                       row: int) -> tuple[list[int], list[int], int]:
        """Each `<image>` id replaced by as many image-token ids as the model fills for that image (in order);
        also where the last image's tokens end."""
        slots = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(slots) != len(images):
            raise ValueError(f"conversation {row} has {len(slots)} {IMAGE_TOKEN} placeholders but "
                             f"{len(images)} images")
        out_ids: list[int] = []
        out_labels: list[int] = []
        start = 0
        for slot, image in zip(slots, images):
            count = self.backbone.image_tokens((image.height, image.width)).visual_tokens
            placeholder = self.images.placeholder(self.image_token_id, count)
            out_ids += ids[start:slot] + placeholder
            out_labels += labels[start:slot] + [IGNORE_INDEX] * len(placeholder)
            start = slot + 1
        return out_ids + ids[start:], out_labels + labels[start:], len(out_ids)

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        length = max(map(len, rows))
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = torch.tensor(row)
            else:
                out[i, length - len(row):] = torch.tensor(row)
        return out

    def decode(self, token_ids: Sequence[int] | torch.Tensor) -> str:
        """Text of generated ids, cut at the first end-of-sequence, special tokens dropped."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        if self.tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(self.tokenizer.eos_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


@contextmanager
def _strict_decoding():
    """Pillow refusing truncated files, whatever a library set globally (lmms-eval's task module sets
    `ImageFile.LOAD_TRUNCATED_IMAGES = True`, which would pad a cut-off image with grey)."""
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _as_list(values, single_types) -> list:
    return [values] if isinstance(values, single_types) else list(values)
