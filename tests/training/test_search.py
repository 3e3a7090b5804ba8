import json

import pytest

from visor import VisorForConditionalGeneration
from visor.training.recipes import load_checkpoint
from visor.training.search import pareto_front, search_configurations

from training_helpers import fast_settings


def _entry(layers, cost, mean):
    return {"layers": layers, "cost": cost, "accuracy": {"mean": mean}}


def test_pareto_front_keeps_only_undominated_subsets():
    results = [_entry([], 1, 40.0), _entry([1], 2, 60.0), _entry([4], 2, 55.0), _entry([1, 4], 3, 60.0),
               _entry([7], 2, 70.0)]
    assert [r["layers"] for r in pareto_front(results)] == [[], [7]]


@pytest.fixture(scope="module")
def stage1_model(tmp_path_factory, tiny_full_checkpoint):
    path = tmp_path_factory.mktemp("stage1")
    VisorForConditionalGeneration.from_stock(load_checkpoint(tiny_full_checkpoint)).save_pretrained(path)
    return path


@pytest.mark.parametrize("max_exhaustive, method, evaluated", [(6, "exhaustive", 4), (1, "greedy", 4)])
def test_search_writes_pareto_configurations_into_the_config(tmp_path, stage1_model, toy_path, max_exhaustive, method,
                                                             evaluated):
    report = search_configurations(stage1_model, toy_path, tmp_path, fast_settings(), max_exhaustive=max_exhaustive)
    assert report["method"] == method and len(report["evaluated"]) == evaluated
    assert report["cost_measure"].startswith("LLM prefill FLOPs")
    saved = load_checkpoint(tmp_path)
    assert saved.config.configurations == report["configurations"]
    assert [1, 4] in saved.config.configurations  # the largest subset always stays
    costs = {tuple(r["layers"]): r["cost"] for r in report["evaluated"]}
    assert [costs[tuple(c)] for c in report["configurations"]] == sorted(costs[tuple(c)] for c in report["configurations"])
    assert json.loads((tmp_path / "search.json").read_text())["configurations"] == report["configurations"]


def test_search_can_keep_the_nested_default(tmp_path, stage1_model, toy_path):
    report = search_configurations(stage1_model, toy_path, tmp_path, fast_settings(), keep_nested=True)
    assert all(c in report["configurations"] for c in ([], [1], [1, 4]))


def test_search_needs_a_visor_model(tmp_path, tiny_full_checkpoint, toy_path):
    with pytest.raises(ValueError, match="needs a VISOR model"):
        search_configurations(tiny_full_checkpoint, toy_path, tmp_path, fast_settings())
