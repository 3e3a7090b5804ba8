"""The full models the demo ships still answer their suites' held-out questions (a regression test on the saved
weights: a replaced, truncated or mismatched checkpoint fails here, not ten minutes into `visor demo`)."""

from __future__ import annotations

import pytest

from visor.demo.pipeline import Demo, DemoPlan, _stock_system
from visor.evaluation.scoring import score

# Test-split accuracy of each shipped model in its committed run (docs/demo, docs/two-hop: 200 per task) is
# 93-100% on every task; 24 questions per task at these floors leave room for sampling noise, not for breakage.
FLOOR = {"read_cell": 75, "bar_value": 75, "count_marks": 70, "dominant_color": 75, "easy_vqa": 75, "key_digit": 75}


@pytest.mark.parametrize("suite", ["demo", "two-hop"])
def test_each_shipped_full_model_answers_its_suites_held_out_questions(tmp_path, suite):
    demo = Demo(tmp_path, DemoPlan(suite=suite), progress=False)
    accuracy = score(demo.data, demo.data.eval_batches("test", 24, 32), _stock_system(demo.full_model(), 3)).accuracy()
    accuracy.pop("mean")
    assert set(accuracy) == set(demo.data.suite.task_names)
    assert all(accuracy[task] >= FLOOR[task] for task in accuracy), accuracy
