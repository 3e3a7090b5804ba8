"""The demo's stages, each resumable: a stage counts as finished only when its `DONE.json` exists.

    full       the shipped tiny full LVLM (`visor/demo/checkpoint`, trained by the command in its TRAINING.md)
    stage1     VISOR stage 1: CA blocks trained on the frozen full model, largest configuration
    universal  VISOR universal training: every parameter, one configuration sampled per step
               (both on `DemoPlan.training_data`, the mix the shipped model was trained on last; the rest of the
               demo scores `DemoPlan.suite`, by default `demo`, whose easy-VQA questions are the package's own)
    policy     label every configuration on train/validation/test, train the router, calibrate τ on validation;
               the policy report on the test split and on held-out task variants (`DemoPlan.variants`)
    evaluate   every system on the test split: full, each fixed configuration, the policy, text-only, baselines
    trained    only with `--trained-baselines`: the baselines given VISOR's training budget (stage 1 + universal
               steps, same data and seed): the full model fine-tuned, pooling + fine-tuning at 2x and 4x, and
               nested pooling (M3-style); each scored on the test split
    report     results.json, report.md, pareto.png and the printed summary

`DONE.json` is written atomically after everything else a stage writes, so a run killed at any point (Ctrl-C
or SIGKILL) never shows a stage as finished that did not finish; running again reuses finished stages,
resumes training stages from their last complete checkpoint and scored systems from their saved scores.
`--fresh` deletes the output folder first.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from visor.backbones import family
from visor.config import ROUTER_MODES, Schedule
from visor.data.suites import get_suite
from visor.demo import report
from visor.evaluation.scoring import Generate, Scores, greedy, new_tokens, score
from visor.files import save_model, write_json
from visor.flops import llm_prefill_flops, prompt_prefill_flops, prompt_token_counts, router_flops
from visor.modeling import VisorModel
from visor.policy.guarantee import check_samples

if TYPE_CHECKING:
    from visor.policy.calibration import Outcome

CHECKPOINT = Path(__file__).parent / "checkpoint"
# The conversion's default data: the mix each shipped full model was trained on last (its script's last stage).
DEMO_MIX = ("synthetic@demo-train:read_cell*3,bar_value,count_marks*2,dominant_color,"
            "easy_vqa_balanced*4,easy_vqa_yes_no*2,easy_vqa_color_yes_no*2")
TWO_HOP_MIX = ("synthetic@two-hop-train:read_cell*3,bar_value,count_marks*2,dominant_color,"
               "easy_vqa_balanced*4,easy_vqa_yes_no*2,easy_vqa_color_yes_no*2,key_digit*3")
VIDEO_MIX = "synthetic@video:which_frame*2,count_frames*2,what_changed*2,dominant_color_video"
# What `--suite NAME` brings along unless told otherwise: the shipped full model trained for that suite (by the
# script named in its TRAINING.md; none yet for video, so `--suite video` needs `--checkpoint`), the conversion's
# data, the held-out variants, and whether universal training keeps the vision tower fixed (the two-hop model was
# taught key_digit with it fixed; see docs/two-hop).
SUITE_DEFAULTS = {
    "demo": dict(training_data=DEMO_MIX, variants="demo-variants", freeze_vision_tower=False),
    "two-hop": dict(training_data=TWO_HOP_MIX, variants="two-hop-variants", freeze_vision_tower=True),
    "video": dict(training_data=VIDEO_MIX, variants="video-variants", freeze_vision_tower=False),
}
SHIPPED_CHECKPOINTS = {"demo": CHECKPOINT, "two-hop": Path(__file__).parent / "checkpoint-two-hop"}
STAGES = ("full", "stage1", "universal", "policy", "evaluate", "report")
TRAINED_STAGE = "trained"  # before the report, when asked for (`Demo.trained_baselines`)
DONE = "DONE.json"
MARKER = ".visor-demo"  # identifies a folder `--fresh` may delete
EVAL_BATCH = 32
FINE_TUNED, POOL_FINE_TUNED, M3 = "full-fine-tuned", "pool-fine-tuned", "m3"  # the trained baselines' names
M3_STRIDES = (1.0, 2.0, 4.0, 8.0)  # nested pooling scales of the M3-style baseline (about 1, 1/4, 1/16, 1/64)
TRAINED_POOL_RATIOS = (2.0, 4.0)  # FLOPs ratios of pooling + fine-tuning


@dataclass(frozen=True)
class DemoPlan:
    """Every size the demo uses; `quick()` is the smoke-test scale run by the test suite."""

    stage1_steps: int = 300
    universal_steps: int = 1800
    batch_size: int = 32
    train_labels_per_task: int = 200
    validation_labels_per_task: int = 400
    test_per_task: int = 200
    router_steps: int = 500
    ratios: tuple[float, ...] = (2.0, 4.0, 8.0)
    max_new_tokens: int = 3
    num_threads: int = 2
    seed: int = 0
    # VISOR's layer schedule (None: `VisorConfig`'s evenly spread default, CA [0, 3] and SA [1, 4] on 6 layers)
    cross_attention_layers: tuple[int, ...] | None = None
    self_attention_layers: tuple[int, ...] | None = None
    cross_attention_key_value_heads: int | None = 1  # per CA block (None: the host layer's); why one: docs/demo.md
    checkpoint: str | None = None  # the full model to start from; None: the one shipped for the suite
    # What the conversion trains on (a `visor train --data` spec): by default the mix the shipped model was trained
    # on last, not the suite's own lopsided easy-VQA questions (why: docs/demo.md).
    training_data: str = DEMO_MIX
    # What every system is scored on (test split), and the held-out task variants the policy is also reported on.
    suite: str = "demo"
    variants: str = "demo-variants"
    freeze_vision_tower: bool = False  # in universal training (stage 1 trains only what VISOR adds anyway)
    router_mode: str = "softmax"  # the router's objective (`visor.modeling.router`)
    # The router's novelty guard (`visor.modeling.novelty`): inputs above this quantile of its training samples'
    # scores skip the cheapest configuration. Off (None) by default: docs/policy.md says why.
    novelty_quantile: float | None = None
    # The budget with a guarantee (`visor.policy.guarantee`), reported next to the demo's own τ: the cheapest τ
    # certified on the validation split to lose at most `max_loss` accuracy (a fraction) against the full model,
    # with probability `confidence`.
    max_loss: float = 0.01
    confidence: float = 0.9

    @property
    def checkpoint_path(self) -> Path:
        if self.checkpoint is not None:
            return Path(self.checkpoint)
        if self.suite not in SHIPPED_CHECKPOINTS:
            raise ValueError(f"no full model is shipped for suite {self.suite!r}; pass --checkpoint DIR "
                             f"(shipped: {', '.join(SHIPPED_CHECKPOINTS)})")
        return SHIPPED_CHECKPOINTS[self.suite]

    @classmethod
    def quick(cls, **changes) -> DemoPlan:
        # 40 validation samples certify nothing below a loss of 0.056 at confidence 0.9: the quick plan asks for 0.1
        values = dict(stage1_steps=6, universal_steps=8, batch_size=8, train_labels_per_task=12,
                      validation_labels_per_task=8, test_per_task=8, router_steps=50, ratios=(4.0,), max_loss=0.1)
        values.update(changes)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Demo:
    output: Path
    plan: DemoPlan = field(default_factory=DemoPlan)
    progress: bool = True
    log: callable = print
    trained_baselines: bool = False  # also run the `trained` stage (not part of the plan: it adds rows, changes none)
    _models: dict = field(default_factory=dict, repr=False)

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.output / stage

    def finished(self, stage: str) -> bool:
        return (self.stage_dir(stage) / DONE).is_file()

    def _finish(self, stage: str, info: dict) -> None:
        write_json(self.stage_dir(stage) / DONE, info)

    def prepare(self, fresh: bool) -> None:
        """Create the output folder; `fresh` empties it first (only if it is a demo folder or empty)."""
        if fresh and self.output.exists():
            if not (self.output / MARKER).exists() and any(self.output.iterdir()):
                raise ValueError(f"{self.output} is not a visor demo folder; refusing to delete it with --fresh")
            shutil.rmtree(self.output)
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / MARKER).touch()
        plan_file = self.output / "plan.json"
        if plan_file.exists() and json.loads(plan_file.read_text()) != json.loads(json.dumps(self.plan.to_dict())):
            raise ValueError(f"{self.output} holds a demo run with other settings; use --fresh or another --output")
        write_json(plan_file, self.plan.to_dict())

    def run(self, fresh: bool = False) -> dict:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file loading/saving bars would bury the demo's own progress
        # Bad suites, a suite without a shipped model and bad data specs fail here, before the folder is touched.
        suite, variants = get_suite(self.plan.suite), get_suite(self.plan.variants)
        if suite.video != variants.video:
            kinds = {True: "video", False: "image"}
            raise ValueError(f"suite {suite.name!r} holds {kinds[suite.video]} tasks but its variants "
                             f"{variants.name!r} hold {kinds[variants.video]} tasks: pick variants of the same kind")
        if self.trained_baselines and suite.video:
            raise ValueError(f"--trained-baselines trains on pooled images (pool-fine-tuned, m3); suite {suite.name!r} "
                             "holds videos: run it without --trained-baselines")
        self.training_data
        if self.plan.router_mode not in ROUTER_MODES:
            raise ValueError(f"router mode must be one of {ROUTER_MODES}, got {self.plan.router_mode!r}")
        check_samples(self.plan.validation_labels_per_task * len(get_suite(self.plan.suite).tasks),
                      self.plan.max_loss, self.plan.confidence)
        if self.plan.num_threads < 0:
            raise ValueError(f"threads must be positive (or 0: torch's default), got {self.plan.num_threads}")
        if not isinstance(self.full_model(), VisorModel):  # a bad schedule fails here, not at stage 1
            config = self.full_model().config
            family(config).VISOR_MODEL.config_class.from_stock_config(config, **self.schedule())
        self.prepare(fresh)
        if self.plan.num_threads:
            torch.set_num_threads(self.plan.num_threads)
        for stage in self.stages:
            if self.finished(stage):
                self.log(f"[{stage}] finished earlier, reused ({self.stage_dir(stage)})")
                continue
            if stage == TRAINED_STAGE:  # new rows: a report made without them is out of date
                (self.stage_dir("report") / DONE).unlink(missing_ok=True)
            self.log(f"[{stage}] running")
            start = time.perf_counter()
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            info = getattr(self, f"stage_{stage}")() or {}
            info["seconds"] = round(time.perf_counter() - start, 1)
            self._finish(stage, info)
            self.log(f"[{stage}] done in {info['seconds']:.0f} s")
        results = json.loads((self.stage_dir("report") / "results.json").read_text())
        self.log(report.summary_text(results))
        return results

    @property
    def stages(self) -> tuple[str, ...]:
        return (*STAGES[:-1], TRAINED_STAGE, STAGES[-1]) if self.trained_baselines else STAGES

    # ---- shared pieces ----------------------------------------------------------------------------------
    @cached_property
    def data(self):
        from visor.training.synthetic import SyntheticSource

        return SyntheticSource(self.full_model().config, self.plan.seed, suite=self.plan.suite)

    @cached_property
    def training_data(self):
        from visor.training.data import resolve_data

        return resolve_data(self.plan.training_data, self.full_model().config, self.plan.seed)

    @cached_property
    def reference_prompts(self) -> dict:
        """One validation batch with every task: the prompts baselines match their FLOPs ratio on."""
        return next(iter(self.data.eval_batches("validation", 8, 64))).inputs

    def full_model(self):
        """The full model the demo starts from (`--checkpoint`, default the shipped tiny LLaVA-OV; loaded once)."""
        if "full" not in self._models:
            from visor.training.recipes import load_checkpoint

            self._models["full"] = load_checkpoint(self.plan.checkpoint_path, attn_implementation="eager").eval()
        return self._models["full"]

    def visor_model(self, stage: str):
        """The VISOR model a stage saved (loaded once)."""
        if stage not in self._models:
            from visor.training.recipes import load_checkpoint

            self._models[stage] = load_checkpoint(self.stage_dir(stage) / "model", attn_implementation="eager").eval()
        return self._models[stage]

    def _train(self, recipe: str, output: str | Path, init: str | Path, steps: int, **overrides) -> dict:
        from visor.training.engine import train
        from visor.training.settings import load_settings

        settings = load_settings(recipe, overrides=dict(
            max_steps=steps, batch_size=self.plan.batch_size, seed=self.plan.seed, eval_every=0,
            save_every=max(steps // 4, 1), samples_per_task=min(self.plan.test_per_task, 50),
            num_threads=self.plan.num_threads, attn_implementation="eager", **overrides,
        ))
        summary = train(recipe, self.training_data, self.output / output, settings, init=str(init), resume=True,
                        progress=self.progress)
        return dict(recipe=recipe, steps=steps, validation=summary.get("validation"))

    # ---- stages -----------------------------------------------------------------------------------------
    def stage_full(self) -> dict:
        training = self.plan.checkpoint_path / "TRAINING.md"
        return dict(checkpoint=self.plan.checkpoint or f"the one shipped for suite {self.plan.suite} "
                                                        f"(visor/demo/{self.plan.checkpoint_path.name})",
                    training=training.read_text() if training.exists() else "no TRAINING.md next to the checkpoint")

    def schedule(self) -> dict:
        """The VISOR shape the plan names (layers, CA heads); what it leaves out takes `VisorConfig`'s default."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in (
            ("cross_attention_layers", self.plan.cross_attention_layers),
            ("self_attention_layers", self.plan.self_attention_layers),
            ("cross_attention_key_value_heads", self.plan.cross_attention_key_value_heads),
        ) if value is not None}

    def stage_stage1(self) -> dict:
        """Convert the full model (with the plan's schedule, if it names one) and train the CA blocks."""
        return self._train("visor-stage1", "stage1", self.plan.checkpoint_path, self.plan.stage1_steps,
                           **self.schedule())

    def stage_universal(self) -> dict:
        return self._train("visor-universal", "universal", self.stage_dir("stage1") / "model",
                           self.plan.universal_steps, freeze_vision_tower=self.plan.freeze_vision_tower)

    def stage_policy(self) -> dict:
        from visor.policy.api import full_model_flops, label_synthetic
        from visor.policy.calibration import calibrate, fixed_outcome, router_outcome
        from visor.policy.guarantee import certify, realised
        from visor.policy.report import policy_report, write_report
        from visor.policy.training import fit_novelty_guard, train_router

        model = self.visor_model("universal")
        folder = self.stage_dir("policy")
        tables = {}
        sizes = dict(train=self.plan.train_labels_per_task, validation=self.plan.validation_labels_per_task,
                     test=self.plan.test_per_task)
        # Held-out splits also record the full model's answers: what the guarantee's loss is measured against.
        reference = dict(reference_model=self.full_model(), reference_name="the full model")
        for split, per_task in sizes.items():
            tables[split] = label_synthetic(model, split, per_task, seed=self.plan.seed, suite=self.plan.suite,
                                            show_progress=self.progress, **({} if split == "train" else reference))
            tables[split].save(folder / f"labels-{split}.safetensors")
        model.configure_router(mode=self.plan.router_mode)
        losses = train_router(model.router, tables["train"], steps=self.plan.router_steps, seed=self.plan.seed)
        if self.plan.novelty_quantile is not None:
            fit_novelty_guard(model, tables["train"], self.plan.novelty_quantile, seed=self.plan.seed)
        cost = router_flops(model.config)
        threshold, outcome, largest = demo_threshold(model, model.router, tables["validation"])
        model.configure_router(threshold=threshold)
        save_model(model, folder / "model", self.data.tokenizer)  # so `visor generate --model DIR` needs nothing else
        # Held-out task variants: neither the model nor the router ever saw these knobs.
        tables["variants"] = label_synthetic(model, "test", self.plan.test_per_task, seed=self.plan.seed,
                                             suite=self.plan.variants, show_progress=self.progress, **reference)
        tables["variants"].save(folder / "labels-variants.safetensors")
        full = {split: full_model_flops(model, table) for split, table in tables.items() if split != "train"}
        reports = {split: policy_report(model.router, tables[split], threshold, cost, full[split])
                   for split in ("test", "variants")}
        write_report(reports["test"], folder / "report")
        write_report(reports["variants"], folder / "report-variants")
        # The same router asked to spend: τ for a budget halfway between the two cheapest configurations.
        cheapest, next_cheapest = (fixed_outcome(tables["validation"], index).mean_flops
                                   for index in (0, 1))
        budget_threshold, _ = calibrate(model.router, tables["validation"], cost,
                                        target_flops=(cheapest + next_cheapest) / 2)
        budget = {f"budget_{split}": _policy_summary(policy_report(model.router, tables[split], budget_threshold,
                                                                   cost, full[split]))
                  for split in ("test", "variants")}
        # The same router with a guarantee: certified on validation, then what it lost on test data (drawn like
        # validation, where the guarantee applies) and on the held-out variants (where it does not).
        guarantee, _ = certify(model.router, tables["validation"], cost, self.plan.max_loss, self.plan.confidence)
        certified = guarantee.to_dict()
        for split in ("test", "variants"):
            guaranteed = router_outcome(model.router, tables[split], guarantee.threshold, cost)
            certified[split] = dict(realised(tables[split], guaranteed),
                                    savings=float(full[split].double().sum() / guaranteed.flops.double().sum()))
        return dict(threshold=threshold, novelty_threshold=model.config.router_novelty_threshold,
                    router_loss=[losses[0], losses[-1]], validation_samples=len(tables["validation"]),
                    validation_largest_accuracy=largest, validation_policy_accuracy=outcome.accuracy,
                    validation_policy_flops=outcome.mean_flops,
                    validation_policy_savings=float(full["validation"].double().sum() / outcome.flops.double().sum()),
                    test=_policy_summary(reports["test"]), variants=_policy_summary(reports["variants"]),
                    test_curves=reports["test"]["router_curves"], variants_curves=reports["variants"]["router_curves"],
                    budget_threshold=budget_threshold, **budget, guarantee=certified)

    def stage_evaluate(self) -> dict:
        folder = self.stage_dir("evaluate")
        data = self.data
        for name, setting, build in self.systems():
            path = folder / f"{name}@{setting}.json"
            if path.exists():
                continue
            scores = score(data, data.eval_batches("test", self.plan.test_per_task, EVAL_BATCH), build(),
                           description=f"{name} {setting}", progress=self.progress)
            write_json(path, dict(method=name, setting=setting, scores=asdict(scores)))
        return dict(systems=len(list(folder.glob("*.json"))))

    def trained_systems(self) -> list[tuple[str, str, dict, list[tuple[str, float | None]]]]:
        """(folder, method, its `full` training overrides, the (setting, pooling stride) it is scored at) of every
        trained baseline: the full model fine-tuned; pooling + fine-tuning at each of `TRAINED_POOL_RATIOS` (the
        stride matched as the untrained pooling baseline's); Matryoshka-style nested pooling (`M3_STRIDES`, one
        scale per step), scored at every scale it was trained at."""
        from visor import reduction

        config = self.full_model().config
        steps = self.plan.stage1_steps + self.plan.universal_steps
        pooled = []
        for ratio in TRAINED_POOL_RATIOS:
            stride = reduction.reduction_for(config, "pool", ratio, self.reference_prompts).stride
            pooled.append((f"{POOL_FINE_TUNED}-{ratio:g}x", POOL_FINE_TUNED, dict(pool_strides=[stride]),
                           [(f"{ratio:g}x", stride)]))
        return [(FINE_TUNED, FINE_TUNED, {}, [(f"{steps} steps", None)]), *pooled,
                (M3, M3, dict(pool_strides=list(M3_STRIDES)), [(f"stride {stride:g}", stride) for stride in M3_STRIDES])]

    def stage_trained(self) -> dict:
        """Every trained baseline trained as long as VISOR's conversion (stage 1 + universal steps), on its data,
        batch size and seed, at universal training's learning rate, without the shipped model's auxiliary loss
        (VISOR gets none), then scored on the test split."""
        from visor.reduction.pool import pool
        from visor.training.recipes import load_checkpoint
        from visor.training.settings import load_settings

        steps = self.plan.stage1_steps + self.plan.universal_steps
        rate = load_settings("visor-universal").learning_rate
        trained = {}
        for name, method, overrides, settings in self.trained_systems():
            folder = Path(TRAINED_STAGE) / name
            start = time.perf_counter()
            self._train("full", folder, self.plan.checkpoint_path, steps, learning_rate=rate, aux_weight=0.0,
                        freeze_vision_tower=self.plan.freeze_vision_tower, **overrides)
            seconds = round(time.perf_counter() - start, 1)  # this run's share, if the stage was resumed
            model = load_checkpoint(self.output / folder / "model", attn_implementation="eager").eval()
            for setting, stride in settings:
                trained[f"{method}@{setting}"] = dict(folder=str(folder), training_seconds=seconds, **overrides)
                path = self.stage_dir(TRAINED_STAGE) / f"{method}@{setting}.json"
                if path.exists():
                    continue
                system = _stock_system(model, self.plan.max_new_tokens) if stride is None else _system(
                    pool(model, stride), self.plan.max_new_tokens, _reduced_cost(pool(model, stride)))
                scores = score(self.data, self.data.eval_batches("test", self.plan.test_per_task, EVAL_BATCH), system,
                               description=f"{method} {setting}", progress=self.progress)
                write_json(path, dict(method=method, setting=setting, scores=asdict(scores)))
        return dict(steps=steps, learning_rate=rate, trained=trained)

    def stage_report(self) -> dict:
        data = self.data
        scored = [json.loads(path.read_text()) for stage in ("evaluate", TRAINED_STAGE)
                  for path in sorted(self.stage_dir(stage).glob("*@*.json"))]
        systems = sorted(((item["method"], item["setting"], Scores(**item["scores"])) for item in scored),
                         key=lambda system: (system[0], report.setting_order(system[1])))
        groups = {task.name: task.group for task in data.suite.tasks}
        majority = data.majority_baseline("test", self.plan.test_per_task)
        stages = {stage: json.loads((self.stage_dir(stage) / DONE).read_text())
                  for stage in (*STAGES[:-1], TRAINED_STAGE) if self.finished(stage)}
        results = report.build_results(systems, groups, majority, self.plan.to_dict(), stages)
        report.write_outputs(results, self.stage_dir("report"))
        return dict(rows=len(results["rows"]))

    # ---- the systems compared -------------------------------------------------------------------------
    def systems(self):
        """(method, setting, builder of a `Generate`) for every row of the comparison."""
        yield from self.stock_systems()
        yield from self.visor_systems()

    def stock_systems(self):
        """The rows that need only the shipped full model: itself, text-only, the baselines applied to it."""
        tokens = self.plan.max_new_tokens
        yield "full", "all tokens", lambda: _stock_system(self.full_model(), tokens)
        floor = "no video" if self.data.suite.video else "no image"
        yield "text-only", floor, lambda: _text_only(self.full_model(), tokens)
        yield from self._baselines(visor=False)

    def visor_systems(self):
        """The rows that need the trained VISOR models: each fixed configuration, the policy, `visor+…` baselines."""
        tokens = self.plan.max_new_tokens
        configurations = self.visor_model("universal").config.configurations
        for index, layers in enumerate(configurations):
            yield "visor", f"SA {list(layers)}", (lambda i=index: _visor_fixed(self.visor_model("universal"), tokens, i))
        yield "visor-policy", "auto", lambda: _visor_auto(self.visor_model("policy"), tokens)
        yield from self._baselines(visor=True)

    def _baselines(self, visor: bool):
        """The token-reduction baselines of the suite's kind: a video suite's reduce the clip (frame subsampling,
        EVS-style pruning, video pooling), an image suite's the image."""
        from visor import reduction

        ratios = self.baseline_ratios()
        config = self.full_model().config
        methods = reduction.video_methods_for(config) if self.data.suite.video else reduction.methods_for(config)
        for method in methods:
            if method.startswith("visor+") == visor:
                for ratio in ratios:
                    yield method, f"{ratio:g}x", (lambda m=method, r=ratio: _reduced_system(self, m, r))

    def baseline_ratios(self) -> list[float]:
        """The plan's FLOPs ratios, plus the policy's own savings on validation (one decimal) once the policy
        stage has run, so that every baseline is also measured at VISOR's FLOPs."""
        ratios = list(self.plan.ratios)
        if self.finished("policy"):
            policy = json.loads((self.stage_dir("policy") / DONE).read_text())
            matched = round(policy.get("validation_policy_savings", 0.0), 1)
            if matched > 1 and all(abs(matched - ratio) >= 0.1 for ratio in ratios):
                ratios.append(matched)
        return ratios


# ---- systems ----------------------------------------------------------------------------------------------
def _system(model, max_new_tokens: int, cost, **options) -> Generate:
    """Greedy answers of `model`; `cost(inputs, output)` gives each sample's LLM prefill FLOPs and configuration."""
    def generate(inputs):
        output = greedy(model, inputs, max_new_tokens, **options)
        return (new_tokens(output, inputs), *cost(inputs, output))

    return generate


def _stock_system(model, max_new_tokens: int) -> Generate:
    return _system(model, max_new_tokens, lambda inputs, _: (prompt_prefill_flops(model.config, inputs, Schedule.full(model.config)), None))


def _visor_fixed(model, max_new_tokens: int, configuration: int) -> Generate:
    def cost(inputs, _):
        flops = prompt_prefill_flops(model.config, inputs, Schedule.of(model.config, configuration))
        return flops, torch.full((len(flops),), configuration)

    return _system(model, max_new_tokens, cost, configuration=configuration)


def _visor_auto(model, max_new_tokens: int) -> Generate:
    def cost(inputs, output):
        chosen = output.past_key_values.configuration
        visual, text = prompt_token_counts(model.config, inputs)
        flops = torch.tensor([llm_prefill_flops(model.config, v, t, Schedule.of(model.config, int(c))).total + router_flops(model.config)
                              for v, t, c in zip(visual.tolist(), text.tolist(), chosen.tolist())])
        return flops, chosen

    return _system(model, max_new_tokens, cost, configuration="auto")


def _text_only(model, max_new_tokens: int) -> Generate:
    """The floor: the full model asked the question without its image or video (what any method costs at least)."""
    visual_tokens = torch.tensor([model.config.image_token_id, getattr(model.config, "video_token_id", -1)])
    pad = model.config.text_config.pad_token_id
    run = _system(model, max_new_tokens, lambda inputs, _: (None, None))

    def generate(inputs):
        keep = ~torch.isin(inputs["input_ids"], visual_tokens)
        rows = [inputs["input_ids"][i][keep[i]] for i in range(len(keep))]
        masks = [inputs["attention_mask"][i][keep[i]] for i in range(len(keep))]
        length = max(len(row) for row in rows)
        input_ids = torch.stack([torch.cat([row.new_full((length - len(row),), pad), row]) for row in rows])
        attention_mask = torch.stack([torch.cat([m.new_zeros(length - len(m)), m]) for m in masks])
        tokens, _, _ = run(dict(input_ids=input_ids, attention_mask=attention_mask))
        return tokens, prompt_prefill_flops(model.config, inputs, Schedule.text_only()), None

    return generate


def _reduced_system(demo: Demo, method: str, ratio: float) -> Generate:
    from visor import reduction

    base = demo.visor_model("universal") if method.startswith("visor+") else demo.full_model()
    # The strength is matched on validation prompts of the demo's own size, not on a generic reference prompt.
    with warnings.catch_warnings(record=True) as caught:  # "out of reach": one line here, real ratio in the report
        warnings.simplefilter("always")
        model = reduction.apply_reduction(base, method, ratio, inputs=demo.reference_prompts)
    for warning in caught:
        demo.log(f"  {method} {ratio:g}x: {warning.message}")
    return _system(model, demo.plan.max_new_tokens, _reduced_cost(model))


def _reduced_cost(model):
    from visor import reduction

    return lambda inputs, _: (reduction.prefill_flops(model, inputs), None)


def demo_threshold(model, router, validation) -> tuple[float, "Outcome", float]:
    """The demo's τ: the cheapest threshold whose validation accuracy is within half a point of the largest
    configuration's, or, when no threshold gets that close, the most accurate one (the cheapest of those).
    Returns τ, the router's validation outcome there, and the largest configuration's accuracy."""
    from visor.policy.calibration import calibrate, fixed_outcome

    largest = fixed_outcome(validation, model.config.largest_configuration).accuracy
    threshold, outcome = calibrate(router, validation, router_flops(model.config),
                                   target_accuracy=max(largest - 0.5, 0), best_if_unreachable=True)
    return threshold, outcome, largest


def _policy_summary(policy_report: dict) -> list[dict]:
    """The policy report's per-group and overall rows (fixed configurations, router, oracle), for DONE.json."""
    return [row for row in policy_report["rows"] if not row["subset"].startswith("task:")]

