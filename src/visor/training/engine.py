"""The training loop, on Hugging Face accelerate: one code path from this CPU to multi-GPU DDP/FSDP/DeepSpeed.

`train(...)` builds the recipe's model, then loops over optimizer steps:

    for each micro-batch of the step (gradient accumulation; DDP syncs only on the last one):
        batch   = data.train_batch(step_indices(step, micro, process))   # pure function of (seed, step, process)
        loss    = answer loss [+ aux_weight * per-patch loss]             # under the settings' mixed precision
        backward(loss / accumulation)
    clip the global gradient norm, AdamW step, cosine-with-warm-up schedule step (once per optimizer step,
    whatever the number of processes: the scheduler is not handed to accelerate, which would step it N times)

with a tqdm bar (loss, samples/s, ETA) on the main process, `metrics.jsonl` lines, atomic checkpoints
(`checkpoint.py`) every `save_every` steps and at the end (then the final model), and validation accuracy per
task at `eval_every` and at the end (`validation.json`), each after that step's weights are saved, so a
validation that fails loses no training; `resume=True` continues from the newest complete checkpoint and
reproduces the uninterrupted run (no data-loader state: the batch at step k is recomputed from k). The folder
is locked for the whole run (`lock.py`): a second run into it is refused.

Testing aid: `VISOR_FAULT_INJECTION=step:SECONDS` sleeps after every optimizer step (so a test can SIGKILL a run
mid-training); `checkpoint:STEP:SECONDS` is described in `checkpoint.py`.

Several processes (DDP, FSDP, DeepSpeed) run this same code: docs/training.md says how and what is not supported.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from visor.evaluation.scoring import evaluate
from visor.files import check_output, save_model, write_json, write_text
from visor.training import checkpoint as ckpt
from visor.training.data import DataSource, resolve_data, step_indices
from visor.training.lock import RunLock
from visor.training.recipes import (
    PatchAuxiliaryHead,
    TrainingModule,
    build_model,
    check_configurations,
    check_recipe,
    configuration_for_step,
    is_visor,
    pool_stride_for_step,
)
from visor.training.settings import TrainingSettings, load_settings

METRICS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.json"
SUMMARY_FILE = "training_summary.json"
FINAL_MODEL_DIR = "model"
SETTINGS_FILE = "settings.json"  # what this folder's run is: recipe, data, starting point, settings
# Settings a resumed run may change: they decide when to log, evaluate and save, and how fast or in how much
# memory a step runs, not what is trained.
BOOKKEEPING = frozenset({"eval_every", "save_every", "keep_checkpoints", "log_every", "num_threads",
                         "samples_per_task", "eval_batch_size", "max_new_tokens", "activation_checkpointing"})


def _optimizer(module: torch.nn.Module, settings: TrainingSettings) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 and "embed" not in name else no_decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("nothing to train: every parameter is frozen")
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        eps=settings.adam_epsilon,
    )


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """After a resume, drop lines a killed run wrote for steps it never checkpointed."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if record.get("step", 0) <= last_step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def _accelerator(settings: TrainingSettings, use_cpu: bool) -> Accelerator:
    """The run's Accelerator. accelerate keeps one global state per process; a library user who trains twice in
    one process (stage 1 in fp32 after a bf16 full run, say) gets that state reset, not an error."""
    precision = settings.precision_on("cpu" if use_cpu or not torch.cuda.is_available() else "cuda")
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=precision,
        cpu=use_cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


class Trainer:
    """One training run. `Trainer(...).run()`; `train(...)` is the one-call form."""

    def __init__(
        self,
        recipe: str,
        data: str | DataSource,
        output_dir: str | os.PathLike,
        settings: TrainingSettings,
        init: str | os.PathLike | None = None,
        model_preset: str | None = None,
        resume: bool = False,
        progress: bool = True,
    ):
        # Every input is checked before the first step: recipe, checkpoint, data, configurations, batch split.
        check_recipe(recipe)
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        self.recipe = recipe
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.progress = progress
        # No GPU: say so, so that a multi-process launch becomes MULTI_CPU (gloo) instead of N lone processes.
        use_cpu = not torch.accelerator.is_available()
        self.micro_batch = settings.micro_batch_size(PartialState(cpu=use_cpu).num_processes)

        self.start_step = 0
        self.fingerprint = run_fingerprint(recipe, data, init, model_preset, settings)
        check_run_folder(self.output_dir, self.fingerprint, resume)  # before the lock writes anything there
        self.lock = RunLock(self.output_dir) if PartialState(cpu=use_cpu).is_main_process else None
        try:
            check_run_folder(self.output_dir, self.fingerprint, resume)  # a run that held it meanwhile has ended
            self._prepare(data, init, model_preset, resume, use_cpu)
        except BaseException:
            self.release()
            raise

    def _prepare(self, data, init, model_preset, resume: bool, use_cpu: bool) -> None:
        """The model, data, optimizer and (resuming) their state: every input checked before the first step."""
        recipe, settings = self.recipe, self.settings
        self.resume_from = ckpt.latest_checkpoint(self.output_dir) if resume else None
        state = ckpt.load_training_state(self.resume_from) if self.resume_from is not None else None
        if state is not None:
            if state.get("recipe") != recipe:
                raise ValueError(
                    f"cannot resume: {self.resume_from} comes from recipe {state.get('recipe')!r}, not {recipe!r}"
                )
            model = build_model(recipe, self.resume_from / ckpt.MODEL_DIR, None, settings)
        else:
            model = build_model(recipe, init, model_preset, settings)
        check_configurations(model, recipe, settings)
        if settings.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=False))
        self.data = data if not isinstance(data, str) else resolve_data(data, model.config, settings.seed,
                                                                        settings, model_dir=init)

        # The aux head belongs to `full` runs (from scratch or continued from a checkpoint, with a fresh head).
        wants_aux = bool(state["aux_head"]) if state is not None else recipe == "full"
        aux_head = None
        if wants_aux and settings.aux_weight > 0 and self.data.num_patch_classes:
            torch.manual_seed(settings.seed + 1)
            aux_head = PatchAuxiliaryHead(model.config.vision_config.hidden_size, self.data.num_patch_classes)
        self.module = TrainingModule(model, aux_head, settings.aux_weight)
        self.accelerator = _accelerator(settings, use_cpu)
        self.optimizer = _optimizer(self.module, settings)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, settings.warmup_steps, settings.max_steps)
        self.visits: Counter[int] = Counter()
        # Validations of the steps the run resumes after (validation.json may hold later ones a killed run wrote).
        self.validation: list[dict[str, Any]] = []
        if state is not None:
            self._load_state(state)
            self.validation = [record for record in read_validation(self.output_dir)
                               if record["step"] <= self.start_step]
        self.module, self.optimizer = self.accelerator.prepare(self.module, self.optimizer)
        self.metrics_path = self.output_dir / METRICS_FILE

    def release(self) -> None:
        """Give the folder's lock back (`run` does when it ends; a Trainer that never runs holds it until then)."""
        if self.lock is not None:
            self.lock.release()

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def model(self):
        """The bare model (unwrapped from DDP & co.)."""
        return self.accelerator.unwrap_model(self.module).model

    def _state(self, step: int) -> dict[str, Any]:
        module = self.accelerator.unwrap_model(self.module)
        return {
            "step": step,
            "samples_seen": step * self.settings.batch_size,
            "recipe": self.recipe,
            "settings": self.settings.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "aux_head": module.aux_head.state_dict() if module.aux_head is not None else {},
            "rng": ckpt.rng_state(),
            "visits": {str(index): count for index, count in sorted(self.visits.items())},
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.module.aux_head is not None:
            self.module.aux_head.load_state_dict(state["aux_head"])
        ckpt.set_rng_state(state["rng"])
        self.visits = Counter({int(index): int(count) for index, count in state["visits"].items()})
        self.start_step = int(state["step"])

    def _model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full weights (gathered by accelerate under FSDP / ZeRO-3; call on every process)."""
        full = self.accelerator.get_state_dict(self.module)
        return {key.removeprefix("model."): value for key, value in full.items() if key.startswith("model.")}

    def save(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        weights = self._model_state_dict()
        if self.accelerator.is_main_process:
            ckpt.save_checkpoint(self.output_dir, step, self.model, self._state(step), self.settings.keep_checkpoints,
                                 state_dict=weights)
        self.accelerator.wait_for_everyone()

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self, step: int, final: bool = False) -> dict[str, Any]:
        """Accuracy per task on the validation split (process 0 generates; the others wait)."""
        settings = self.settings
        record: dict[str, Any] = {"step": step}
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            model = self.model
            options = dict(per_task=settings.samples_per_task, batch_size=settings.eval_batch_size,
                           max_new_tokens=settings.max_new_tokens, autocast=self.accelerator.autocast)
            if is_visor(model):
                indices = (range(len(model.config.configurations)) if self.recipe == "visor-universal"
                           else [configuration_for_step(self.recipe, model, settings, step)])
                record["accuracy"] = {str(index): evaluate(model, self.data, configuration=index, **options)
                                      for index in indices}
                record["configurations"] = model.config.configurations
            elif settings.pool_strides is not None:  # the model as it was trained to read: pooled
                from visor.reduction.pool import pool

                record["accuracy"] = {f"pool {stride:g}": evaluate(pool(model, stride), self.data, **options)
                                      for stride in settings.pool_strides}
            else:
                record["accuracy"] = {"full": evaluate(model, self.data, **options)}
            baseline = getattr(self.data, "majority_baseline", None)
            if baseline is not None:
                record["majority"] = baseline("validation", settings.samples_per_task)
            record["final"] = final
            self.validation.append(record)
            write_json(self.output_dir / VALIDATION_FILE, self.validation)
            _append_jsonl(self.metrics_path, {"step": step, "validation": record["accuracy"]})
        self.accelerator.wait_for_everyone()
        return record

    # ---- the loop ---------------------------------------------------------------------------------------------
    def step(self, step: int):
        """One optimizer step (1-based): its micro-batches forward and backward, clipping, the update.
        Returns (mean losses: total, answer, aux; the gradient norm before clipping or None; the configuration
        and the pooling stride it trained, None where they do not apply)."""
        accelerator, settings = self.accelerator, self.settings
        configuration = configuration_for_step(self.recipe, self.model, settings, step)
        if configuration is not None:
            self.visits[configuration] += 1
        stride = pool_stride_for_step(settings, step)
        accumulation = settings.gradient_accumulation_steps
        totals = torch.zeros(3, device=accelerator.device)
        for micro in range(accumulation):
            indices = step_indices(step - 1, micro, accelerator.process_index, accelerator.num_processes,
                                   self.micro_batch, accumulation)
            batch = _to_device(self.data.train_batch(indices), accelerator.device)
            sync = micro == accumulation - 1
            with (nullcontext() if sync else accelerator.no_sync(self.module)), accelerator.autocast():
                loss, answer_loss, aux_loss = self.module(batch, configuration, stride)
            accelerator.backward(loss / accumulation)
            totals += torch.stack([loss.detach(), answer_loss, aux_loss]).float() / accumulation
        grad_norm = None
        if settings.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(
                [p for p in self.module.parameters() if p.requires_grad], settings.max_grad_norm
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = accelerator.reduce(totals, reduction="mean")
        if not all(math.isfinite(value) for value in totals.tolist()):
            raise FloatingPointError(f"non-finite loss at step {step}: {totals.tolist()}")
        return totals, grad_norm, configuration, stride

    def run(self) -> dict[str, Any]:
        """Train to `max_steps`, save, validate; returns the summary. The folder's lock goes back however it ends."""
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> dict[str, Any]:
        accelerator, settings = self.accelerator, self.settings
        main = accelerator.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_checkpoints(self.output_dir)
            if self.resume_from is not None:
                _truncate_metrics(self.metrics_path, self.start_step)
            elif self.metrics_path.exists():
                self.metrics_path.unlink()
            write_json(self.output_dir / SETTINGS_FILE, self.fingerprint)
        accelerator.wait_for_everyone()

        bar = tqdm(total=settings.max_steps, initial=self.start_step, disable=not (main and self.progress),
                   desc=self.recipe, unit="step", dynamic_ncols=True)
        started = time.time()
        window_start, window_samples = time.time(), 0
        last_saved = self.start_step if self.resume_from is not None else None
        fault = os.environ.get("VISOR_FAULT_INJECTION", "")
        step_delay = float(fault.split(":")[1]) if fault.startswith("step:") else 0.0
        step = self.start_step
        for step in range(self.start_step + 1, settings.max_steps + 1):
            totals, grad_norm, configuration, stride = self.step(step)
            window_samples += settings.batch_size
            if step_delay:
                time.sleep(step_delay)

            if step % settings.log_every == 0 or step == settings.max_steps:
                elapsed = time.time() - window_start
                record = {
                    "step": step,
                    "loss": totals[0].item(),
                    "answer_loss": totals[1].item(),
                    "aux_loss": totals[2].item(),
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "samples_per_second": window_samples / max(elapsed, 1e-9),
                    "elapsed": time.time() - started,
                }
                if configuration is not None:
                    record["configuration"] = configuration
                    record["visits"] = {str(k): v for k, v in sorted(self.visits.items())}
                if stride is not None:
                    record["pool_stride"] = stride
                if main:
                    _append_jsonl(self.metrics_path, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_second']:.1f}")
                window_start, window_samples = time.time(), 0
            bar.update(1)

            if settings.save_every and step % settings.save_every == 0 and step != settings.max_steps:
                self.save(step)
                last_saved = step
            if settings.eval_every and step % settings.eval_every == 0 and step != settings.max_steps:
                self.validate(step)
        bar.close()
        wall = time.time() - started

        # Weights are saved before they are validated: a validation that fails loses no training.
        final_step = max(step, self.start_step)
        if last_saved != final_step:
            self.save(final_step)
        weights = self._model_state_dict()
        if main:
            # With its processor, when the data has one, the folder answers questions on its own (`visor generate`).
            save_model(self.model, self.output_dir / FINAL_MODEL_DIR, getattr(self.data, "processor", None),
                       state_dict=weights, safe_serialization=True)
        if final_step > self.start_step or not self.validation or not self.validation[-1].get("final"):
            self.validate(final_step, final=True)
        summary = {
            "recipe": self.recipe,
            "steps": final_step,
            "resumed_from_step": self.start_step if self.resume_from is not None else None,
            "wall_seconds_this_run": wall,
            "num_processes": accelerator.num_processes,
            "visits": {str(k): v for k, v in sorted(self.visits.items())},
            "validation": self.validation[-1] if self.validation else None,
            "skipped_records": len(getattr(self.data, "skipped", ())),
        }
        if main:
            write_json(self.output_dir / SUMMARY_FILE, summary)
        accelerator.wait_for_everyone()
        return summary


def read_validation(output_dir: Path) -> list[dict[str, Any]]:
    """The validation records a run folder holds (validation.json; none before the first validation)."""
    path = output_dir / VALIDATION_FILE
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt: {error}") from error


def run_fingerprint(recipe: str, data: str | DataSource, init, model_preset: str | None,
                    settings: TrainingSettings) -> dict[str, Any]:
    """What makes a run this run (all but its `BOOKKEEPING` settings): a folder holds one, and resuming it with
    anything else is refused. Written as settings.json, as JSON reads it back (tuples become lists)."""
    fingerprint = dict(recipe=recipe, data=data if isinstance(data, str) else type(data).__qualname__,
                       init=None if init is None else str(init), model_preset=model_preset, **settings.to_dict())
    return json.loads(json.dumps(fingerprint))


def check_run_folder(output_dir: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    """Refuse an output that cannot be a folder, a fresh run into a folder that holds one (its checkpoints would
    mix with the new run's), and resuming a run with other settings than it started with (a folder written before
    its settings.json recorded data and starting point is compared on what it recorded)."""
    check_output(output_dir, "folder", option="output")
    held = [name for name in (SETTINGS_FILE, ckpt.CHECKPOINT_DIR, FINAL_MODEL_DIR, METRICS_FILE, SUMMARY_FILE)
            if (output_dir / name).exists()]
    if not resume:
        if held:
            raise ValueError(f"{output_dir} already holds a training run ({', '.join(held)}): pass --resume to "
                             "continue it, or choose another --output")
        return
    if not (output_dir / SETTINGS_FILE).is_file():
        return
    try:
        recorded = json.loads((output_dir / SETTINGS_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{output_dir / SETTINGS_FILE} is corrupt: {error}") from error
    differences = [f"{key}: {recorded[key]!r} -> {value!r}" for key, value in fingerprint.items()
                   if key not in BOOKKEEPING and key in recorded and recorded[key] != value]
    if differences:
        raise ValueError(f"cannot resume {output_dir}: it was started with other settings ("
                         + "; ".join(differences) + "); resume with the same ones, or choose another --output")


def train(recipe: str, data: str | DataSource, output_dir: str | os.PathLike, settings: TrainingSettings | None = None,
          init: str | os.PathLike | None = None, model_preset: str | None = None, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Run one recipe to `settings.max_steps`; returns the summary also written to training_summary.json.

    `settings=None` takes the recipe's defaults (`load_settings(recipe)`), as the command line does.
    """
    check_recipe(recipe)
    trainer = Trainer(recipe, data, output_dir, settings or load_settings(recipe), init=init, model_preset=model_preset,
                      resume=resume, progress=progress)
    return trainer.run()
