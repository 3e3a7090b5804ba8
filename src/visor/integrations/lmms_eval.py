"""lmms-eval model plugin: run lmms-eval benchmarks on VISOR (and stock LLaVA-OV) checkpoints saved on disk.

    lmms-eval --model visor --model_args pretrained=DIR,configuration=auto,tau=0.7 --tasks docvqa_val \\
        --batch_size 8 --device cuda

lmms-eval finds the model through the `lmms_eval.models` entry point (`manifest` below); nothing is forked or
copied. Model arguments: `pretrained` (a local checkpoint folder with its tokenizer), `configuration` ("auto":
the policy, or an index into the model's configurations), `tau` (the policy's threshold; default the saved
one) and `max_frames_num` (lmms-eval's name for the most frames kept of each video, spread uniformly, a shorter
video keeping each of its frames once, on every family that reads video: LLaVA-OV, Qwen2.5-VL and Qwen3-VL;
default the checkpoint's rule, Qwen3-VL's sampling by fps among them).
A document brings one image, or one video as lmms-eval's video tasks bring it: a path (here a folder of frames
or an animated GIF / WebP, what `visor.data.frames.load_frames` reads; video files need their frames extracted
first). Answers are greedy; after each `generate_until` call the log says which configurations ran and the LLM
prefill FLOPs they cost next to the full model's.

This module imports lmms-eval, which `import visor` never does: only lmms-eval imports it, through the
entry point.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image

from visor.data.processor import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from visor.flops import savings
from visor.integrations.runner import CheckpointRunner

MODEL_NAME = "visor"
# lmms-eval's own Hugging Face models default to 1024 new tokens when a task sets no `max_new_tokens`.
DEFAULT_MAX_NEW_TOKENS = 1024


def manifest():
    """The `lmms_eval.models` entry point: registers `--model visor` (imported only when lmms-eval asks)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VisorLmms")


class VisorLmms(lmms):
    """lmms-eval's model interface over `CheckpointRunner`: requests in, answers or log-likelihoods out."""

    def __init__(self, pretrained: str, configuration: str | int = "auto", tau: float | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, device: str | None = None,
                 max_frames_num: int | str | None = None) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_frames_num", max_frames_num)):
            if value is not None and (not str(value).isdigit() or int(value) < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_frames = None if max_frames_num is None else int(max_frames_num)
        # lmms-eval passes `max_batch_size` to every model; it only bounds "auto" batch sizes, not offered here.
        self.batch_size = int(batch_size)
        self.runner = CheckpointRunner(pretrained, configuration, tau, device)
        self.answers = []  # every generated `Answer`, for the FLOPs summary and for callers who want them

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers in batches of requests that share task, split and generation arguments."""
        results = [None] * len(requests)
        for indices in self._batches(requests, key=lambda args: (args[4], args[5], repr(sorted(args[1].items())))):
            options = dict(requests[indices[0]].args[1])
            _check_greedy(options)
            until = options.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            visuals, questions = self._prompts([requests[index] for index in indices])
            for rows, inputs in self._by_kind(visuals):
                answers = self.runner.generate(questions=[questions[row] for row in rows], until=until,
                                               max_new_tokens=options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                                               **inputs)
                for row, answer in zip(rows, answers):
                    results[indices[row]] = answer
        self.answers += results
        if requests:
            self._log_summary(results)
        return [answer.text for answer in results]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood per continuation token, whether the continuation is the greedy answer).

        A loss, not the log-probability the base class's docstring names: lmms-eval's multiple-choice scoring
        picks the choice with the *smallest* value, and its own models (llava_onevision, llava_hf) return the
        mean token loss, so this ranks choices the way they do.
        """
        results = [None] * len(requests)
        for indices in self._batches(requests, key=lambda args: (args[4], args[5])):
            batch = [requests[index] for index in indices]
            visuals, questions = self._prompts(batch)
            continuations = []
            for request in batch:
                target, _, doc_id, task, split = request.args[1:6]
                # Plain loglikelihood tasks pass their doc_to_target function; multiple choice passes the text.
                continuations.append(target if isinstance(target, str) else str(target(self._doc(task, split, doc_id))))
            for rows, inputs in self._by_kind(visuals):
                scores = self.runner.loglikelihood(questions=[questions[row] for row in rows],
                                                   continuations=[continuations[row] for row in rows], **inputs)
                for row, score in zip(rows, scores):
                    results[indices[row]] = (-score.log_probability / score.tokens, score.greedy)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "visor answers single-turn questions: its processor renders one user turn with one image or video, so "
            "multi-round tasks are not supported"
        )

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _batches(self, requests: list[Instance], key) -> list[list[int]]:
        """Request indices grouped by `key(request.args)` (requests that can share a batch), in chunks."""
        if any(len(request.args) < 6 for request in requests):
            raise NotImplementedError("visor needs an image or a video with every request (requests without a document, "
                                      "such as acc_mutual_info's unconditional ones, are not supported)")
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            groups[key(request.args)].append(index)
        return [group[start:start + self.batch_size] for group in groups.values()
                for start in range(0, len(group), self.batch_size)]

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _prompts(self, requests: list[Instance]) -> tuple[list[Image.Image | str], list[str]]:
        """Each request's one visual (an image, or a video's path) and its question (the context without `<image>`
        or `<video>` placeholders: the processor puts the visual where the model's chat format wants it)."""
        visuals, questions = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args[:6]
            visual = doc_to_visual(self._doc(task, split, doc_id))
            if len(visual) != 1 or not isinstance(visual[0], (Image.Image, str)):
                raise NotImplementedError(
                    f"visor answers about exactly one image or one video (a path) per question; {task} document "
                    f"{doc_id} has {[type(item).__name__ for item in visual]}"
                )
            visuals.append(visual[0])
            questions.append(context.replace(IMAGE_PLACEHOLDER, " ").replace(VIDEO_PLACEHOLDER, " ").strip())
        return visuals, questions

    def _by_kind(self, visuals: list[Image.Image | str]) -> list[tuple[list[int], dict]]:
        """A batch's image rows and its video rows (the processor takes a batch of one kind), each with the
        runner's visual arguments."""
        kinds = []
        for videos in (False, True):
            rows = [row for row, visual in enumerate(visuals) if isinstance(visual, str) == videos]
            if rows:
                chosen = [visuals[row] for row in rows]
                kinds.append((rows, dict(images=None, videos=chosen, num_frames=self.num_frames) if videos
                              else dict(images=chosen)))
        return kinds

    def _log_summary(self, answers) -> None:
        ran = Counter(answer.configuration for answer in answers)
        spent = [answer.llm_prefill_flops for answer in answers]
        logger.info(
            f"visor: {len(answers)} answers, configurations {dict(sorted(ran.items(), key=str))}, mean LLM prefill "
            f"{sum(spent) / len(spent) / 1e9:.4f} GFLOPs, "
            f"{savings([answer.full_flops for answer in answers], spent):.2f}x less than the full model"
        )


def _check_greedy(options: dict) -> None:
    """A clear error instead of silently answering greedily when a task asks for sampling or beam search."""
    sampling = options.get("do_sample") or (options.get("temperature") or 0) > 0
    if sampling or (options.get("num_beams") or 1) > 1:
        raise ValueError(f"visor answers greedily; the task asks for sampling or beam search: {options}")
