"""A saved checkpoint answering batches of (image or video, question) requests: greedy answers and answer
log-likelihoods.

This is what an evaluation harness needs from a model, without the harness: `visor.integrations.lmms_eval` only
translates lmms-eval's requests into these calls, so everything here is tested without lmms-eval installed.

The checkpoint is a VISOR one (a fixed configuration, or the policy with threshold τ) or a stock one of a supported
family (the full model, the row every VISOR number is compared with). Prompts go through the checkpoint's own
processor (`VisorProcessor.from_pretrained`: its tokenizer, chat template, image and video settings), exactly as
`visor generate` answers one question; each answer records the configuration that ran and its LLM prefill FLOPs by
the one counter (`visor.flops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from visor.config import Schedule
from visor.data.processor import VisorProcessor
from visor.device import check_device, default_device
from visor.evaluation.scoring import greedy, new_tokens, teacher_forced
from visor.flops import llm_prefill_flops, router_flops
from visor.modeling.router import check_threshold
from visor.policy.guarantee import Guarantee, guarantee_at
from visor.policy.labels import prompt_tokens
from visor.training.recipes import is_visor, load_checkpoint


# The processor's fields with one value per token: the Qwen-VL families' token types beside the ids and labels.
TOKEN_FIELDS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")


@dataclass(frozen=True)
class Answer:
    """One generated answer: its text, the configuration that ran ("full" for a stock model) and what it cost."""

    text: str
    configuration: int | str
    llm_prefill_flops: int
    full_flops: int
    self_attention_layers: list[int]
    visual_tokens: int
    text_tokens: int


@dataclass(frozen=True)
class Score:
    """A continuation scored under teacher forcing: its summed log-probability, its length in tokens, and
    whether greedy decoding produces exactly it."""

    log_probability: float
    tokens: int
    greedy: bool


class CheckpointRunner:
    """Loads a checkpoint folder once and answers batches with it.

    `configuration`: "auto" (the policy; the largest configuration when the model has no router) or an index
    into `config.configurations`; a stock model takes only "auto" (or "full"). `tau`: the policy's threshold
    (default: the one saved with the model).
    """

    def __init__(self, pretrained: str | Path, configuration: str | int = "auto", tau: float | None = None,
                 device: str | torch.device | None = None):
        folder = Path(pretrained)
        self.device = check_device(device or default_device())
        self.model = load_checkpoint(folder).eval().to(self.device)
        config = self.model.config
        # Left padding for both: generation needs it, and it puts every continuation at the end of its row.
        self.processor = VisorProcessor.from_pretrained(folder, config, padding_side="left")
        self.is_visor = is_visor(self.model)
        self.tau = None if tau is None else check_threshold(tau)
        if not self.is_visor:
            if configuration not in ("auto", "full") or tau is not None:
                raise ValueError("a stock model has one configuration: drop `configuration` and `tau`")
            configuration = "full"
        else:
            configuration = parse_configuration(configuration)
            if configuration == "auto" and self.model.router is None:  # the policy of a single configuration
                configuration = config.largest_configuration
            try:
                configuration = config.check_choice(configuration, self.model.router_trained)
            except ValueError as error:
                raise ValueError(f"{folder}: {error}") from None
            if configuration != "auto" and tau is not None:
                raise ValueError("τ (tau) sets the policy's budget: it applies to configuration 'auto' only")
        self.configuration = configuration

    @property
    def routed(self) -> bool:
        return self.configuration == "auto"

    @property
    def guarantee(self) -> Guarantee | None:
        """What the policy's τ is certified for, when it runs at the τ calibrated with a guarantee."""
        return guarantee_at(self.model.config, self.tau) if self.routed else None

    def _options(self, configuration) -> dict:
        """Keyword arguments that select the configuration (none for a stock model)."""
        if not self.is_visor:
            return {}
        if isinstance(configuration, str) and configuration == "auto":
            return dict(configuration=configuration, router_threshold=self.tau)
        return dict(configuration=configuration)

    def _inputs(self, images, questions, answers=None, videos=None, num_frames=None) -> dict:
        inputs = self.processor(images, questions, answers, videos=videos, num_frames=num_frames)
        return {key: value.to(self.device) for key, value in inputs.items()}

    @torch.no_grad()
    def generate(self, images: Sequence | None, questions: Sequence[str], max_new_tokens: int = 16,
                 until: Sequence[str] = (), videos: Sequence | None = None, num_frames: int | None = None) -> list[Answer]:
        """Greedy answers, cut at the end-of-sequence token and before the first of the `until` strings; `videos`
        (one per row, after the row's image or instead of it, `VisorProcessor`'s) for a family that reads video."""
        inputs = self._inputs(images, questions, videos=videos, num_frames=num_frames)
        output = greedy(self.model, inputs, max_new_tokens, **self._options(self.configuration))
        answer_tokens = new_tokens(output, inputs)
        ran = output.past_key_values.configuration.tolist() if self.is_visor else ["full"] * len(answer_tokens)
        config = self.model.config
        extra = router_flops(config) if self.routed else 0
        answers = []
        for row, (visual, text) in enumerate(prompt_tokens(config, inputs).tolist()):
            schedule = Schedule.full(config) if ran[row] == "full" else Schedule.of(config, ran[row])
            answers.append(Answer(
                text=_cut(self.processor.decode(answer_tokens[row]), until),
                configuration=ran[row],
                llm_prefill_flops=llm_prefill_flops(config, visual, text, schedule).total + extra,
                full_flops=llm_prefill_flops(config, visual, text, Schedule.full(config)).total,
                self_attention_layers=sorted(schedule.self_attention),
                visual_tokens=visual,
                text_tokens=text,
            ))
        return answers

    @torch.no_grad()
    def loglikelihood(self, images: Sequence | None, questions: Sequence[str], continuations: Sequence[str],
                      videos: Sequence | None = None, num_frames: int | None = None) -> list[Score]:
        """log P(continuation | image or video, question) per request, with its token count and greedy check
        (`videos` as `generate` takes them).

        The continuation is scored as the start of the assistant's turn (surrounding whitespace dropped, no
        end-of-sequence token). Under the policy the router decides from the prompt alone, as in generation,
        and the continuation is then scored with the configuration it chose.
        """
        configuration = self.configuration
        if self.routed:
            prompts = self._inputs(images, questions, videos=videos, num_frames=num_frames)
            configuration = self.model(**prompts, **self._options("auto"), logits_to_keep=1).configuration
        inputs = self._inputs(images, questions, continuations, videos=videos, num_frames=num_frames)
        # The processor ends every answer with end-of-sequence; with left padding that is the last column of
        # every field with one value per token.
        inputs = {key: value[:, :-1] if key in TOKEN_FIELDS else value for key, value in inputs.items()}
        labels = inputs.pop("labels")
        scored_length = int((labels != -100).sum(dim=1).max())
        # Logits only where they predict a continuation token (the last prompt token onwards): memory stays
        # (batch, answer length, vocabulary) however long the visual prompt is.
        logits = self.model(**inputs, **self._options(configuration), logits_to_keep=scored_length + 1).logits
        totals, counts, exact = teacher_forced(logits[:, :-1], labels[:, -scored_length:])
        return [Score(float(total), int(tokens), bool(match)) for total, tokens, match in zip(totals, counts, exact)]


def parse_configuration(value) -> int | str:
    """A configuration from user text (the CLI, lmms-eval model arguments): "auto" or an index."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"configuration must be 'auto' or an index, got {value!r}")


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()
