"""`visor evaluate`: the accuracies `visor.evaluation.scoring.evaluate` gives, per configuration, from the command
line; bad input stops before any model runs."""

import json
from pathlib import Path

import pytest

from visor import cli
from visor.evaluate import evaluate_checkpoint
from visor.evaluation.scoring import evaluate
from visor.training.data import resolve_data
from visor.training.recipes import load_checkpoint

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "visor" / "demo" / "checkpoint"
DATA = "synthetic@demo:dominant_color,count_marks"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate") / "visor"
    assert cli.main(["convert", "--model", str(SHIPPED), "--output", str(folder)]) == 0
    return folder


def test_each_configuration_scores_as_evaluate_does(converted, tmp_path, capsys):
    model = load_checkpoint(converted)
    source = resolve_data(DATA, model.config, 0)
    expected = {str(index): evaluate(model, source, split="test", per_task=6, batch_size=4, configuration=index)
                for index in (0, 2)}
    output = tmp_path / "accuracy.json"
    assert cli.main(["evaluate", "--model", str(converted), "--data", DATA, "--per-task", "6", "--batch-size", "4",
                     "--configurations", "0,2", "--output", str(output)]) == 0
    assert json.loads(output.read_text()) == expected
    printed = capsys.readouterr().out.splitlines()
    tasks = list(expected["0"])
    assert len(tasks) == 3 and tasks[-1] == "mean" and printed[0].split() == ["configuration", *tasks]
    assert printed[1].split() == ["0", *(f"{expected['0'][task]:.1f}" for task in tasks)]


def test_a_stock_model_is_evaluated_as_it_is():
    accuracy = evaluate_checkpoint(SHIPPED, DATA, per_task=4, batch_size=4)
    assert list(accuracy) == ["full"] and len(accuracy["full"]) == 3 and "mean" in accuracy["full"]


def test_bad_input_is_refused_before_evaluating(converted):
    with pytest.raises(ValueError, match="a stock model: it has no configurations"):
        evaluate_checkpoint(SHIPPED, DATA, configurations=(0,))
    with pytest.raises(ValueError, match=r"configurations \[7\] do not exist"):
        evaluate_checkpoint(converted, DATA, configurations=(7,))
    with pytest.raises(ValueError, match="per_task must be at least 1"):
        evaluate_checkpoint(converted, DATA, per_task=0)
    with pytest.raises(ValueError, match="matches nothing"):
        evaluate_checkpoint(converted, "bogus")
