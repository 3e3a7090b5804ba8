"""`visor bench --train` on the tiny preset: one optimizer step per recipe, measured in child processes."""

import json
import os
from concurrent.futures.process import BrokenProcessPool

import pytest
import torch

from visor.backbones import backbone_for
from visor.cli import build_parser, run_command
from visor.presets import preset_config
from visor.training.bench import (
    NominalImageSample,
    TrainBenchPlan,
    TrainBenchRow,
    _in_child,
    extrapolated_peak,
    measure_step,
    save_random_stock,
    train_table,
)
from visor.training.recipes import build_model
from visor.training.settings import load_settings

PER_CROP = 64  # the tiny preset's tokens per crop: 2, 3 and 5 crops are anyres images


@pytest.fixture(scope="module")
def tiny_stock(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-bench") / "stock"
    save_random_stock("tiny", folder)
    return folder


def test_the_nominal_sample_is_the_image_the_flops_price_then_labelled_text():
    config = preset_config("tiny")
    sample = NominalImageSample(config, 3 * PER_CROP, 16)
    batch = sample.train_batch([7])
    image = batch["input_ids"] == config.image_token_id
    assert int(image.sum()) == backbone_for(config).nominal_visual_tokens(3 * PER_CROP) == sample.llm_visual_tokens
    assert bool(image[0, :sample.llm_visual_tokens].all()) and batch["input_ids"].shape == (1, sample.llm_visual_tokens + 16)
    assert bool((batch["labels"][image] == -100).all())
    assert torch.equal(batch["labels"][~image], batch["input_ids"][~image])
    assert torch.equal(batch["pixel_values"], backbone_for(config).nominal_pixel_inputs(3 * PER_CROP)["pixel_values"])
    with pytest.raises(ValueError, match="batches of one sample"):
        sample.train_batch([0, 1])


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("recipe", ["full", "visor-stage1", "visor-universal"])
def test_one_measured_step_per_recipe(recipe, checkpointing, tiny_stock, tmp_path):
    measured = measure_step("tiny", recipe, checkpointing, tiny_stock, tmp_path / "run", 2 * PER_CROP, 8)
    trainable = sum(p.numel() for p in build_model(recipe, tiny_stock, None, load_settings(recipe)).parameters()
                    if p.requires_grad)
    assert measured["trainable_parameters"] == trainable
    assert measured["step_s"] > 0 and measured["peak_memory_bytes"] > 2**20
    assert measured["device"] == "cpu"


def test_the_peak_is_extrapolated_on_the_line_through_the_last_two_measured_rows():
    def row(tokens, peak):
        return TrainBenchRow("full", False, tokens, tokens, 8, "measured", peak_memory_bytes=peak)

    assert extrapolated_peak([], 100) is None and extrapolated_peak([row(10, 5)], 100) is None
    assert extrapolated_peak([row(1, 0), row(10, 100), row(20, 150)], 40) == 250


def test_a_child_that_dies_is_a_broken_pool():
    with pytest.raises(BrokenProcessPool):
        _in_child(os._exit, 1)


def test_a_killed_row_is_reported_and_its_series_stops(monkeypatch):
    """Every measured step's process dies (as the kernel's OOM killer would end it): the first count of each series
    says "killed", the larger ones are not run."""
    from visor.training import bench

    def dying(function, *args):
        if function is measure_step:
            raise BrokenProcessPool("killed")

    monkeypatch.setattr(bench, "_in_child", dying)
    plan = TrainBenchPlan("tiny", visual_tokens=(3 * PER_CROP, 2 * PER_CROP), recipes=("full", "visor-stage1"),
                          checkpointing=(True,))
    rows = bench.run_train_bench(plan, limit=2**40)
    assert [(row.recipe, row.visual_tokens, row.outcome) for row in rows] == [
        (recipe, count, outcome) for recipe in ("full", "visor-stage1")
        for count, outcome in ((2 * PER_CROP, "killed"), (3 * PER_CROP, "not run: a smaller count was killed"))]
    assert all(row.peak_memory_bytes is None and row.step_s is None for row in rows)


def test_the_command_measures_each_series_and_predicts_what_it_does_not_run(tmp_path):
    """A 1 MiB limit: the first two counts of each series run (nothing to extrapolate from yet), the third is
    predicted above the limit and not run."""
    counts = (2 * PER_CROP, 3 * PER_CROP, 5 * PER_CROP)
    argv = ["bench", "--train", "--preset", "tiny", "--visual-tokens", ",".join(map(str, counts)), "--text-tokens", "8",
            "--recipes", "visor-stage1", "--memory-limit", str(1 / 1024), "--output", str(tmp_path / "out")]
    assert run_command(build_parser().parse_args(argv)) == 0
    written = json.loads((tmp_path / "out" / "train.json").read_text())
    assert written["memory_limit_bytes"] == 2**20 and written["plan"]["recipes"] == ["visor-stage1"]
    rows = written["rows"]
    assert [(row["activation_checkpointing"], row["visual_tokens"]) for row in rows] == \
        [(ckpt, count) for ckpt in (False, True) for count in counts]
    for first, second, third in (rows[:3], rows[3:]):
        assert first["outcome"] == second["outcome"] == "measured"
        assert first["peak_memory_bytes"] > 2**20 and first["predicted_peak_bytes"] is None
        assert third["outcome"] == "predicted above the limit" and third["step_s"] is None
        slope = (second["peak_memory_bytes"] - first["peak_memory_bytes"]) / (
            second["llm_visual_tokens"] - first["llm_visual_tokens"])
        assert third["predicted_peak_bytes"] == round(
            second["peak_memory_bytes"] + slope * (third["llm_visual_tokens"] - second["llm_visual_tokens"]))
    assert (tmp_path / "out" / "train.png").stat().st_size > 0
    table = train_table([TrainBenchRow(**row) for row in rows])
    assert table.count("predicted above the limit") == 2 and "visor-stage1 + checkpointing" in table


def test_the_plan_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="unknown recipe 'bogus'"):
        TrainBenchPlan("tiny", visual_tokens=(2 * PER_CROP,), recipes=("bogus",))
    with pytest.raises(ValueError, match="no image runs exactly 1 crops"):
        TrainBenchPlan("tiny", visual_tokens=(PER_CROP,))
    with pytest.raises(ValueError, match="memory limit must be positive"):
        TrainBenchPlan("tiny", visual_tokens=(2 * PER_CROP,), memory_limit_gib=0)
    with pytest.raises(ValueError, match="unknown preset"):
        TrainBenchPlan("bogus")
