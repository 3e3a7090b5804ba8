"""`TrainingSettings`: every training hyper-parameter in one dataclass, with documented defaults.

Values come from, in order of precedence: `--set key=value` flags, a YAML file (`--config FILE.yaml`, a flat
mapping of the same keys), the recipe's defaults (`RECIPE_DEFAULTS`), then the field defaults below. Unknown
keys and values of the wrong type are errors, reported before any model is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import yaml

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def native_bf16(device: str) -> bool:
    """Whether `device` (`cpu` or `cuda`) computes bf16 matmuls natively (a CPU: oneDNN's AVX-512/AMX path)."""
    return torch.cuda.is_bf16_supported() if device == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass
class TrainingSettings:
    # ---- optimisation -----------------------------------------------------------------------------------
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW). 1e-3 is what breaks the hard-task plateau for tiny from-scratch models
    (src/visor/demo/checkpoint/TRAINING.md); the VISOR recipes default lower (see `RECIPE_DEFAULTS`)."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not to norms, biases, gates or embeddings' 1-D params)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    warmup_steps: int = 30
    """Linear warm-up steps, then cosine decay to 0 at `max_steps` (transformers' `get_cosine_schedule_with_warmup`)."""
    max_grad_norm: float = 1.0
    """Gradient clipping on the global norm; 0 disables clipping."""
    batch_size: int = 64
    """Global batch: samples per optimizer step over all processes and accumulation steps."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each process; the micro-batch is
    batch_size / (gradient_accumulation_steps * num_processes) and must divide evenly."""
    max_steps: int = 1000
    """Optimizer steps (the cosine schedule ends here). `--max-steps` sets it."""
    # ---- auxiliary per-patch loss (recipe `full`) -----------------------------------------------------------
    aux_weight: float = 1.0
    """Weight of the per-patch cross-entropy on the vision tower's output (training-only linear head); 0
    disables it. Used only by `full` when the data provides per-patch targets."""
    freeze_vision_tower: bool = False
    """Keep the vision tower's weights fixed (`full` and `visor-universal`; stage 1 freezes every base weight
    anyway), as LLaVA recipes keep a pretrained encoder: what a task needs beyond the tower's features is then
    computed in the language model, where VISOR's configurations differ."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's (and each CA block's) activations in the backward pass instead of keeping
    them: less memory for about one more forward pass of compute (transformers' activation checkpointing)."""
    pool_strides: list[float] | None = None
    """Recipe `full` only: the model reads its images average-pooled before the LLM (`visor.reduction.pool`) at one
    of these strides per step, drawn uniformly from (seed, step) as universal training draws configurations. One
    stride is pooling + fine-tuning; several nested ones (1, 2, 4, 8) train one model for every scale
    (Matryoshka-style, one scale per step). None: no pooling."""
    # ---- VISOR --------------------------------------------------------------------------------------------
    configuration_weights: list[float] | None = None
    """Sampling weights over `config.configurations` for `visor-universal` (None: uniform)."""
    stage1_configuration: int | None = None
    """Configuration `visor-stage1` trains (None: the largest, as the paper does)."""
    cross_attention_init: str = "zero"
    """How a VISOR recipe initialises CA blocks when it converts a full model: `zero` (fresh weights) or `host`
    (copies of the host layer's attention). `visor-stage1` defaults to `host` (see `RECIPE_DEFAULTS`)."""
    cross_attention_gate: bool = True
    """Tanh gates (initialised closed) on the CA blocks of a converted model."""
    cross_attention_key_value_heads: int | None = None
    """Key/value heads of each CA block of a converted model (None: the host layer's; fewer start from the mean of
    the host heads and make projecting the visual tokens cheaper)."""
    cross_attention_layers: list[int] | None = None
    """Layers that host a CA block in a converted model (None: `VisorConfig`'s default schedule)."""
    self_attention_layers: list[int] | None = None
    """Optional SA layers of a converted model, nested configurations (None: `VisorConfig`'s default)."""
    # ---- data ---------------------------------------------------------------------------------------------
    samples_per_task: int = 100
    """Validation samples per task at each evaluation (and for `configurations search`)."""
    eval_batch_size: int = 32
    image_root: str | None = None
    """`--data llava:FILE.json`: the folder its image paths are relative to (None: the JSON file's folder).
    `--image-root` sets it."""
    images_outside_root: bool = False
    """`--data llava:FILE.json`: let image paths lead out of `image_root` (through `..`, an absolute path or a
    symbolic link). By default a record whose image resolves outside it is broken: a data file names no file
    elsewhere on the machine. `--images-outside-root` sets it."""
    max_sequence_length: int | None = None
    """Conversation data: a longer sample is cut to this many tokens from its end (its last answers lose their
    labels); one whose images alone end beyond it is an error. None: no limit."""
    skip_broken_records: bool = False
    """Conversation data: leave out broken records (no assistant turn or an empty one, a missing, unreadable or too
    small image, placeholders that do not match the images), counted in the run's summary, instead of stopping
    with an error naming the first."""
    max_new_tokens: int = 8
    """Greedy tokens generated per validation answer."""
    # ---- bookkeeping --------------------------------------------------------------------------------------
    eval_every: int = 500
    """Validation every N steps (0: only at the end)."""
    save_every: int = 200
    """Checkpoint every N steps (0: only at the end). `--save-every` sets it."""
    keep_checkpoints: int = 1
    """Complete checkpoints kept besides the one being written (the newest ones)."""
    log_every: int = 10
    """Steps between lines in metrics.jsonl (and progress-bar updates of the loss)."""
    seed: int = 0
    mixed_precision: str = "auto"
    """`bf16` autocast (6x faster matmuls on AMX CPUs and on recent GPUs), `no` for fp32 (tests), `fp16`, or
    `auto`: bf16 where the device computes it natively, fp32 elsewhere (on a CPU without bf16 instructions,
    bf16 matmuls run tens of times slower than fp32 ones)."""
    num_threads: int = 0
    """torch threads per process (0: leave torch's default)."""
    attn_implementation: str = "sdpa"
    """Attention kernel for training and evaluation (`sdpa` or `eager`)."""
    embedding_std: float | None = 0.3
    """From-scratch `full` runs: std of the token embeddings' initialisation (None: transformers' default,
    0.02). At 0.02 a question word's embedding is a small part of its residual stream next to what attention
    mixes in, and the tiny model answered from the image alone, ignoring the question (notes in TRAINING.md)."""
    model_layers: int | None = None
    """Text-model depth for `--model` presets that take one (None: the preset's default)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name, value in vars(self).items():  # NaN passes every comparison below, and inf most
            if any(isinstance(number, float) and not math.isfinite(number)
                   for number in (value if isinstance(value, list) else [value])):
                raise ValueError(f"{name} must be finite, got {value}")

        def positive(name):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

        for name in ("learning_rate", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_batch_size",
                     "samples_per_task", "max_new_tokens", "log_every"):
            positive(name)
        for name in ("warmup_steps", "eval_every", "save_every", "max_grad_norm", "aux_weight", "weight_decay",
                     "num_threads", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_sequence_length is not None and self.max_sequence_length <= 0:
            raise ValueError(f"max_sequence_length must be positive (or null for no limit), got "
                             f"{self.max_sequence_length}")
        if self.embedding_std is not None and self.embedding_std <= 0:
            raise ValueError(f"embedding_std must be positive (or null for the default), got {self.embedding_std}")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be at least 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if self.cross_attention_init not in ("zero", "host"):
            raise ValueError(f"cross_attention_init must be 'zero' or 'host', got {self.cross_attention_init!r}")
        if self.pool_strides is not None and (not self.pool_strides or any(
                isinstance(stride, bool) or not stride >= 1 for stride in self.pool_strides)):
            raise ValueError(f"pool_strides must be a non-empty list of strides >= 1 (1 = no pooling), "
                             f"got {self.pool_strides}")
        if self.configuration_weights is not None:
            weights = self.configuration_weights
            if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"configuration_weights must be non-negative with a positive sum, got {weights}")

    def precision_on(self, device: str) -> str:
        """`mixed_precision` with `auto` resolved for `device` (`cpu` or `cuda`)."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if native_bf16(device) else "no"

    def micro_batch_size(self, num_processes: int) -> int:
        per_step = self.gradient_accumulation_steps * num_processes
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into {self.gradient_accumulation_steps} accumulation "
                f"steps x {num_processes} processes"
            )
        return self.batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Recipe-specific defaults, applied under the YAML file and the flags.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {},
    # Host-initialised, ungated CA blocks: on the demo's tiny model the converted model's answer loss starts at
    # 1.2 instead of 5.3 with closed gates (stock 0.79), because text then reads the image as the layer did.
    "visor-stage1": {"learning_rate": 1e-3, "weight_decay": 0.0, "max_steps": 300,
                     "cross_attention_init": "host", "cross_attention_gate": False},
    "visor-universal": {"learning_rate": 3e-4, "max_steps": 300},
}

_FIELDS = {f.name: f for f in fields(TrainingSettings)}


def _coerce(name: str, value: Any) -> Any:
    """A YAML or command-line value converted to the field's type, or a ValueError naming the key."""
    annotation = str(_FIELDS[name].type)
    if isinstance(value, str) and not annotation.startswith("str"):
        value = yaml.safe_load(value) if value.strip() else value
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null")
    try:
        if annotation.startswith("list[float]"):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [float(v) for v in value]
        if annotation.startswith("list[int]"):
            if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or int(v) != v for v in value):
                raise TypeError
            return [int(v) for v in value]
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if annotation.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if annotation.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot use {value!r} (expected {annotation})") from None
    return value


def load_settings(
    recipe: str,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    **explicit: Any,
) -> TrainingSettings:
    """Recipe defaults < YAML file < `key=value` overrides < explicit keyword values (the dedicated flags)."""
    values: dict[str, Any] = dict(RECIPE_DEFAULTS.get(recipe, {}))
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise ValueError(f"config file {config_file} does not exist")
        with open(config_file) as handle:
            try:
                loaded = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                raise ValueError(f"config file {config_file} is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {config_file} must hold a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects key=value, got {item!r}")
            values[key.strip().replace("-", "_")] = value
    values.update({key: value for key, value in explicit.items() if value is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; known: {', '.join(sorted(_FIELDS))}")
    return TrainingSettings(**{key: _coerce(key, value) for key, value in values.items()})
