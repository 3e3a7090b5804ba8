"""The full models the demo ships still answer their suites' held-out questions (a regression test on the saved
weights: a replaced, truncated or mismatched checkpoint fails here, not ten minutes into `visor demo`)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from visor.demo.pipeline import Demo, DemoPlan, _stock_system
from visor.demo.systems import score_system

# Test-split accuracy of each shipped model in its committed run (docs/demo, docs/two-hop: 200 per task) is
# 93-100% on every task; 24 questions per task at these floors leave room for sampling noise, not for breakage.
FLOOR = {"read_cell": 75, "bar_value": 75, "count_marks": 70, "dominant_color": 75, "easy_vqa": 75, "key_digit": 75}


@pytest.mark.parametrize("suite", ["demo", "two-hop"])
def test_each_shipped_full_model_answers_its_suites_held_out_questions(tmp_path, suite):
    demo = Demo(tmp_path, DemoPlan(suite=suite), progress=False)
    scores = score_system(_stock_system(demo.full_model(), 3), demo.data, "test", per_task=24, progress=False)
    right = defaultdict(list)
    for task, correct in zip(scores.tasks, scores.correct):
        right[task].append(correct)
    accuracy = {task: 100 * sum(values) / len(values) for task, values in right.items()}
    assert set(accuracy) == set(demo.data.suite.task_names)
    assert all(accuracy[task] >= FLOOR[task] for task in accuracy), accuracy
