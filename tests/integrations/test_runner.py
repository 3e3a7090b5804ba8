"""`CheckpointRunner`: batched answers equal `visor generate`'s one-at-a-time ones, and answer log-likelihoods
equal the log-softmax of a direct forward pass, for fixed configurations, the policy and a stock model."""

from __future__ import annotations

import datasets
import pytest
import torch

from visor.data.processor import VisorProcessor
from visor.generate import answer
from visor.integrations.lmms_tasks import DATA_FILE, VIDEO_DATA_FILE
from visor.integrations.runner import CheckpointRunner, _cut
from visor.training.recipes import load_checkpoint


@pytest.fixture(scope="module")
def questions(task_folder):
    """Five (image, question) pairs, one per demo task: questions of different lengths, so batches pad."""
    rows = datasets.load_dataset("parquet", data_files=str(task_folder / DATA_FILE), split="train")
    rows = [rows[index] for index in range(0, len(rows), 2)]
    return [row["image"] for row in rows], [row["question"] for row in rows]


@pytest.mark.parametrize("options", [dict(configuration=0), dict(configuration=2), dict(tau=0.0), dict(tau=1.0)])
def test_batched_answers_match_one_at_a_time(checkpoints, questions, options):
    images, texts = questions
    runner = CheckpointRunner(checkpoints["visor"], **options)
    answers = runner.generate(images, texts, max_new_tokens=3)
    for image, text, got in zip(images, texts, answers):
        expected = answer(checkpoints["visor"], image, text, max_new_tokens=3, **options)
        assert (got.text, got.configuration, got.llm_prefill_flops, got.full_flops) == (
            expected["answer"], expected["configuration"], expected["llm_prefill_flops"], expected["full_flops"])


def test_stock_model_runs_in_full(checkpoints, questions):
    answers = CheckpointRunner(checkpoints["stock"]).generate(*questions, max_new_tokens=2)
    assert all(got.configuration == "full" and got.llm_prefill_flops == got.full_flops for got in answers)


def _direct_scores(folder, image, question, configuration, continuation_id, video=None):
    """(log P(token | prompt), token is the argmax) from one unpadded forward over the prompt alone."""
    model = load_checkpoint(folder).eval()
    processor = VisorProcessor.from_pretrained(folder, model.config)
    options = {} if configuration == "full" else dict(configuration=configuration)
    with torch.no_grad():
        logits = model(**processor(image, question, videos=video), **options).logits[0, -1]
    return float(torch.log_softmax(logits, dim=-1)[continuation_id]), int(logits.argmax()) == continuation_id


@pytest.mark.parametrize("name, options", [("visor", dict(configuration=1)), ("visor", dict(tau=0.5)),
                                           ("stock", {})])
def test_loglikelihood_matches_a_direct_forward(checkpoints, questions, name, options):
    images, texts = questions
    runner = CheckpointRunner(checkpoints[name], **options)
    # Continuations: each greedy one-word answer, and a word the model does not pick.
    answers = runner.generate(images, texts, max_new_tokens=1)
    ran, greedy_words = [got.configuration for got in answers], [got.text for got in answers]
    other_words = ["red" if word != "red" else "blue" for word in greedy_words]
    tokenizer = runner.processor.tokenizer
    for words, greedy in ((greedy_words, True), (other_words, False)):
        scores = runner.loglikelihood(images, texts, words)
        for image, text, configuration, word, score in zip(images, texts, ran, words, scores):
            word_id = tokenizer.convert_tokens_to_ids(word)
            log_probability, is_argmax = _direct_scores(checkpoints[name], image, text, configuration, word_id)
            assert score.tokens == 1 and score.greedy == is_argmax == greedy
            assert score.log_probability == pytest.approx(log_probability, abs=1e-4)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_a_qwen_vl_loglikelihood_matches_a_direct_forward(qwen_video_checkpoints, questions, video_task_folder, kind):
    """On the Qwen-VL families (whose batches carry per-token `mm_token_type_ids`), for images and videos."""
    images, texts = questions
    videos = None
    if kind == "video":
        rows = datasets.load_dataset("parquet", data_files=str(video_task_folder / VIDEO_DATA_FILE), split="train")
        images, videos, texts = None, [row["video"] for row in rows][::3], [row["question"] for row in rows][::3]
    folder = qwen_video_checkpoints["visor"]
    runner = CheckpointRunner(folder, configuration=1)
    words = [got.text for got in runner.generate(images, texts, max_new_tokens=1, videos=videos)]
    scores = runner.loglikelihood(images, texts, words, videos=videos)
    for row, (text, word, score) in enumerate(zip(texts, words, scores)):
        word_id = runner.processor.tokenizer.convert_tokens_to_ids(word)
        log_probability, is_argmax = _direct_scores(folder, None if images is None else images[row], text, 1,
                                                    word_id, None if videos is None else videos[row])
        assert score.tokens == 1 and score.greedy == is_argmax
        assert score.log_probability == pytest.approx(log_probability, abs=1e-4)


def test_multi_token_continuations_sum_their_tokens(checkpoints, questions):
    images, texts = questions
    runner = CheckpointRunner(checkpoints["visor"], configuration=0)
    one, two = runner.loglikelihood(images[:1] * 2, texts[:1] * 2, ["red", "red blue"])
    assert (one.tokens, two.tokens) == (1, 2)
    assert two.log_probability < one.log_probability  # one more token, one more negative log-probability


def test_stop_strings_cut_the_answer():
    assert _cut("yes\nno", ["\n"]) == "yes"
    assert _cut("red . blue", [".", ""]) == "red"
    assert _cut(" three ", []) == "three"


@pytest.mark.parametrize("name, options, message", [
    ("visor", dict(configuration=7), "does not exist"),
    ("visor", dict(configuration="big"), "'auto' or an index"),
    ("visor", dict(tau=1.5), "must lie in"),
    ("stock", dict(configuration=0), "one configuration"),
    ("stock", dict(tau=0.5), "one configuration"),
])
def test_bad_options_are_clear_errors(checkpoints, name, options, message):
    with pytest.raises(ValueError, match=message):
        CheckpointRunner(checkpoints[name], **options)


def test_checkpoint_without_tokenizer_is_a_clear_error(checkpoints, tmp_path):
    load_checkpoint(checkpoints["visor"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer"):
        CheckpointRunner(tmp_path)
