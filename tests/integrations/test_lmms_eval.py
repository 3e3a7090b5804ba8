"""The lmms-eval plugin, run as lmms-eval runs it: found through the `lmms_eval.models` entry point and driven by
lmms-eval's own `simple_evaluate` and CLI on the local synthetic tasks. Skipped where lmms-eval is not installed
(`make lmms`), but never in CI: `make test-lmms` sets VISOR_REQUIRE_LMMS=1, which turns a missing lmms-eval into a
failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest

if not os.environ.get("VISOR_REQUIRE_LMMS"):
    pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from visor.data.frames import load_frames  # noqa: E402
from visor.integrations.lmms_eval import VisorLmms  # noqa: E402
from visor.integrations.lmms_tasks import DATA_FILE, VIDEO_DATA_FILE, utils  # noqa: E402
from visor.integrations.runner import CheckpointRunner  # noqa: E402


@pytest.fixture(scope="module")
def docs(task_folder):
    return datasets.load_dataset("parquet", data_files=str(task_folder / DATA_FILE), split="train")


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert get_model("visor") is VisorLmms


def test_simple_evaluate_scores_what_the_runner_answers(checkpoints, task_folder, docs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    output = simple_evaluate(model="visor", model_args=f"pretrained={checkpoints['visor']},configuration=auto,tau=0.5",
                             tasks=["visor_synthetic"], batch_size=3, device="cpu", task_manager=manager)
    assert output["n-samples"]["visor_synthetic"]["effective"] == len(docs)
    # lmms-eval logs and scores exactly the runner's greedy answers.
    runner = CheckpointRunner(checkpoints["visor"], "auto", 0.5)
    expected = runner.generate([doc["image"] for doc in docs], [doc["question"] for doc in docs], max_new_tokens=8,
                               until=["\n"])
    logged = {sample["doc_id"]: sample for sample in output["samples"]["visor_synthetic"]}
    assert [logged[index]["filtered_resps"][0] for index in range(len(docs))] == [got.text for got in expected]
    assert output["results"]["visor_synthetic"]["exact_match,none"] == pytest.approx(
        sum(utils.process_results(doc, [got.text])["exact_match"] for doc, got in zip(docs, expected)) / len(docs))


@pytest.fixture(scope="module")
def video_docs(video_task_folder):
    return datasets.load_dataset("parquet", data_files=str(video_task_folder / VIDEO_DATA_FILE), split="train")


def test_a_video_task_is_scored_as_the_runner_answers(checkpoints, video_task_folder, video_docs):
    """lmms-eval hands the plugin each clip as a path, as its own video tasks do; `max_frames_num` samples it."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(video_task_folder), include_defaults=False)
    output = simple_evaluate(model="visor", model_args=f"pretrained={checkpoints['visor']},configuration=0,"
                                                       "max_frames_num=4",
                             tasks=["visor_synthetic_video"], batch_size=3, device="cpu", task_manager=manager)
    assert output["n-samples"]["visor_synthetic_video"]["effective"] == len(video_docs)
    runner = CheckpointRunner(checkpoints["visor"], 0)
    expected = runner.generate(None, [doc["question"] for doc in video_docs], max_new_tokens=8, until=["\n"],
                               videos=[doc["video"] for doc in video_docs], num_frames=4)
    logged = {sample["doc_id"]: sample for sample in output["samples"]["visor_synthetic_video"]}
    assert [logged[index]["filtered_resps"][0] for index in range(len(video_docs))] == [got.text for got in expected]
    assert all(answer.visual_tokens == expected[0].visual_tokens > 0 for answer in expected)


def test_a_qwen_vl_video_task_is_scored_as_the_runner_answers(qwen_video_checkpoints, video_task_folder,
                                                             video_docs):
    """Qwen2.5-VL and Qwen3-VL through lmms-eval's evaluator: `max_frames_num` beyond the clips' frames keeps each
    clip's frames once (at most that many), on Qwen3-VL too, whose stock processor would repeat them."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    folder, frames = qwen_video_checkpoints["visor"], len(load_frames(video_docs[0]["video"]))
    manager = TaskManager(include_path=str(video_task_folder), include_defaults=False)
    output = simple_evaluate(model="visor", model_args=f"pretrained={folder},configuration=0,"
                                                       f"max_frames_num={frames + 4}",
                             tasks=["visor_synthetic_video"], batch_size=3, device="cpu", task_manager=manager)
    runner = CheckpointRunner(folder, 0)
    questions, videos = [doc["question"] for doc in video_docs], [doc["video"] for doc in video_docs]
    expected = runner.generate(None, questions, max_new_tokens=8, until=["\n"], videos=videos,
                               num_frames=frames + 4)
    logged = {sample["doc_id"]: sample for sample in output["samples"]["visor_synthetic_video"]}
    assert [logged[index]["filtered_resps"][0] for index in range(len(video_docs))] == [got.text for got in expected]
    every_frame = runner.processor.videos.load(videos[0], frames)
    assert every_frame.indices == tuple(range(frames))
    assert all(answer.visual_tokens == runner.processor.videos.token_count(every_frame) for answer in expected)


@pytest.mark.parametrize("max_frames_num", [None, 4])
def test_qwen_vl_video_requests_are_answered_and_scored_as_the_runner(qwen_video_checkpoints, video_docs,
                                                                      max_frames_num):
    """generate_until and loglikelihood on video documents, sampled by `max_frames_num` (None: the checkpoint's
    rule, Qwen2.5-VL every frame, Qwen3-VL by its fps), equal the runner's answers and scores."""
    folder = str(qwen_video_checkpoints["visor"])
    lm = VisorLmms(pretrained=folder, configuration=1, batch_size=3, max_frames_num=max_frames_num)
    lm.task_dict = {"video": {"test": video_docs}}
    indices = [3, 0, 6, 1]
    questions = [video_docs[index]["question"] for index in indices]
    videos = [video_docs[index]["video"] for index in indices]
    answers = [video_docs[index]["answer"] for index in indices]
    got = lm.generate_until(_requests(video_docs, "generate_until", [
        (question, {"max_new_tokens": 3}, utils.doc_to_video, index, "video", "test")
        for question, index in zip(questions, indices)]))
    expected = lm.runner.generate(None, questions, max_new_tokens=3, videos=videos, num_frames=max_frames_num)
    assert got == [answer.text for answer in expected]
    assert [answer.visual_tokens for answer in lm.answers] == [answer.visual_tokens for answer in expected]
    scored = lm.loglikelihood(_requests(video_docs, "loglikelihood", [
        (question, answer, utils.doc_to_video, index, "video", "test")
        for question, answer, index in zip(questions, answers, indices)]))
    scores = lm.runner.loglikelihood(None, questions, answers, videos=videos, num_frames=max_frames_num)
    for (loss, greedy), score in zip(scored, scores):
        assert loss == pytest.approx(-score.log_probability / score.tokens, abs=1e-5) and greedy == score.greedy
    if max_frames_num is not None:  # fewer frames than the clip's: exactly that many
        assert len(lm.runner.processor.videos.load(videos[0], max_frames_num)) == max_frames_num


@pytest.fixture(scope="module", params=["llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def released_visor(request, tmp_path_factory):
    """Each family's checkpoint as released (tests/released_checkpoints.py), converted to VISOR."""
    from pathlib import Path

    from visor.convert import convert

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from released_checkpoints import write_released_checkpoint

    root = tmp_path_factory.mktemp(request.param)
    return convert(write_released_checkpoint(request.param, root / "stock"), root / "visor")


def test_every_family_as_released_is_scored_as_the_runner_answers(released_visor, task_folder, docs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    output = simple_evaluate(model="visor", model_args=f"pretrained={released_visor},configuration=0",
                             tasks=["visor_synthetic"], batch_size=4, device="cpu", task_manager=manager)
    runner = CheckpointRunner(released_visor, 0)
    expected = runner.generate([doc["image"] for doc in docs], [doc["question"] for doc in docs], max_new_tokens=8,
                               until=["\n"])
    logged = {sample["doc_id"]: sample for sample in output["samples"]["visor_synthetic"]}
    assert [logged[index]["filtered_resps"][0] for index in range(len(docs))] == [got.text for got in expected]


def test_multiple_choice_requests_built_by_lmms_eval_score_by_likelihood(checkpoints, task_folder, docs):
    """The choice task's requests, built and scored by lmms-eval's own task code around our `loglikelihood`.

    (Not through `simple_evaluate`: lmms-eval 0.7.3's evaluator turns every response into a string,
    `unwrap_generation_output`, so loglikelihood and multiple-choice tasks fail there for every model.)
    """
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    task = get_task_dict(["visor_synthetic_choice"], manager)["visor_synthetic_choice"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    lm = VisorLmms(pretrained=str(checkpoints["visor"]), configuration=0, batch_size=4)
    lm.task_dict = {"visor_synthetic_choice": task.dataset}
    responses = lm.loglikelihood(task.instances)
    by_doc = {}
    for instance, response in zip(task.instances, responses):
        by_doc.setdefault(instance.doc_id, []).append((instance.idx, response))
    runner = CheckpointRunner(checkpoints["visor"], 0)
    for doc_id, doc in enumerate(docs):
        choices = doc["choices"]
        scores = runner.loglikelihood([doc["image"]] * len(choices), [doc["question"]] * len(choices), choices)
        best = max(range(len(choices)), key=lambda index: scores[index].log_probability / scores[index].tokens)
        ordered = [response for _, response in sorted(by_doc[doc_id])]
        assert task.process_results(doc, ordered)["acc"] == float(choices[best] == doc["answer"])


def test_cli_writes_results(checkpoints, task_folder, tmp_path):
    """`lmms-eval --model visor ...` as a user types it, in a fresh process (entry point, argument parsing)."""
    command = [sys.executable, "-m", "lmms_eval", "--model", "visor", "--model_args",
               f"pretrained={checkpoints['stock']}", "--tasks", "visor_synthetic", "--include_path", str(task_folder),
               "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path)]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, env=environment, capture_output=True, timeout=300)
    written = [json.loads(path.read_text()) for path in tmp_path.rglob("*_results.json")]
    assert len(written) == 1 and "exact_match,none" in written[0]["results"]["visor_synthetic"]


# ---- the model API directly: batching, request order, errors --------------------------------------------------
def _requests(docs, kind: str, arguments) -> list[Instance]:
    return [Instance(request_type=kind, arguments=args, idx=0,
                     metadata={"task": args[4], "doc_id": args[3], "repeats": 1}) for args in arguments]


@pytest.fixture(scope="module")
def lm(checkpoints, docs):
    model = VisorLmms(pretrained=str(checkpoints["visor"]), configuration=1, batch_size=2)
    model.task_dict = {"synthetic": {"test": docs}}
    return model


def test_answers_come_back_in_request_order_across_batches_and_generation_settings(lm, docs):
    short, longer = {"max_new_tokens": 1, "until": ["\n"]}, {"max_new_tokens": 3}
    order = [4, 0, 7, 2, 9]
    requests = _requests(docs, "generate_until", [
        (docs[index]["question"], short if position % 2 else longer, utils.doc_to_visual, index, "synthetic", "test")
        for position, index in enumerate(order)])
    got = lm.generate_until(requests)
    for position, index in enumerate(order):
        length = 1 if position % 2 else 3
        expected = lm.runner.generate([docs[index]["image"]], [docs[index]["question"]], max_new_tokens=length)
        assert got[position] == expected[0].text
    assert len(lm.answers) >= len(order)


def test_loglikelihood_is_the_mean_token_loss(lm, docs):
    continuations = ["red", "red blue", "3"]
    requests = _requests(docs, "loglikelihood", [
        (docs[index]["question"], continuation, utils.doc_to_visual, index, "synthetic", "test")
        for index, continuation in zip((1, 5, 8), continuations)])
    got = lm.loglikelihood(requests)
    for (loss, greedy), index, continuation in zip(got, (1, 5, 8), continuations):
        [score] = lm.runner.loglikelihood([docs[index]["image"]], [docs[index]["question"]], [continuation])
        assert loss == pytest.approx(-score.log_probability / score.tokens, abs=1e-5) and greedy == score.greedy


@pytest.mark.parametrize("options, message", [({"do_sample": True}, "greedily"), ({"num_beams": 3}, "greedily")])
def test_sampling_requests_are_refused(lm, docs, options, message):
    requests = _requests(docs, "generate_until", [(docs[0]["question"], options, utils.doc_to_visual, 0,
                                                   "synthetic", "test")])
    with pytest.raises(ValueError, match=message):
        lm.generate_until(requests)


def test_image_and_video_documents_in_one_batch_come_back_in_order(checkpoints, docs, video_docs):
    """A batch of a task whose documents mix images and videos runs as one image batch and one video batch."""
    lm = VisorLmms(pretrained=str(checkpoints["visor"]), configuration=0, batch_size=4, max_frames_num="3")
    mixed = [docs[0], video_docs[0], docs[1], video_docs[1]]
    lm.task_dict = {"mixed": {"test": mixed}}
    visuals = [utils.doc_to_visual, utils.doc_to_video] * 2
    options = {"max_new_tokens": 2}
    got = lm.generate_until(_requests(mixed, "generate_until", [
        (doc["question"], options, visual, index, "mixed", "test") for index, (doc, visual) in enumerate(zip(mixed, visuals))]))
    images = lm.runner.generate([docs[0]["image"], docs[1]["image"]], [docs[0]["question"], docs[1]["question"]],
                                max_new_tokens=2)
    videos = lm.runner.generate(None, [video_docs[0]["question"], video_docs[1]["question"]], max_new_tokens=2,
                                videos=[video_docs[0]["video"], video_docs[1]["video"]], num_frames=3)
    assert got == [images[0].text, videos[0].text, images[1].text, videos[1].text]
    assert [answer.visual_tokens for answer in lm.answers[-4:]] == [
        images[0].visual_tokens, videos[0].visual_tokens, images[1].visual_tokens, videos[1].visual_tokens]


@pytest.mark.parametrize("arguments, message", [(dict(batch_size="two"), "batch_size must be a positive integer"),
                                                (dict(max_frames_num="0"), "max_frames_num must be a positive integer")])
def test_bad_model_arguments_are_clear_errors(checkpoints, arguments, message):
    with pytest.raises(ValueError, match=message):
        VisorLmms(pretrained=str(checkpoints["visor"]), **arguments)


def test_documents_without_exactly_one_image_are_refused(lm, docs):
    two_images = lambda doc: utils.doc_to_visual(doc) * 2  # noqa: E731
    requests = _requests(docs, "generate_until", [(docs[0]["question"], {}, two_images, 0, "synthetic", "test")])
    with pytest.raises(NotImplementedError, match="exactly one image"):
        lm.generate_until(requests)
