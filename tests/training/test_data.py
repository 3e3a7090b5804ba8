import pytest

from visor.training.data import resolve_data, step_indices


@pytest.mark.parametrize("processes, accumulation", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_every_split_of_a_step_covers_the_same_samples(processes, accumulation):
    global_batch = 8
    micro = global_batch // (processes * accumulation)
    for step in range(3):
        seen = [index for process in range(processes) for m in range(accumulation)
                for index in step_indices(step, m, process, processes, micro, accumulation)]
        assert sorted(seen) == list(range(step * global_batch, (step + 1) * global_batch))


def test_data_specs_that_match_nothing_are_errors(stock_factory):
    config = stock_factory(num_layers=2).config
    for spec, message in [("", "empty"), ("imagenet", "matches nothing"), ("no_such_module_xyz:build", "cannot import"),
                          ("visor.training.data:not_there", "no callable")]:
        with pytest.raises(ValueError, match=message):
            resolve_data(spec, config, seed=0)


def test_toy_source_is_deterministic(stock_factory, toy_path):
    source = resolve_data(toy_path, stock_factory(num_layers=2).config, seed=3)
    first, again = source.train_batch([5, 6, 7]), source.train_batch([5, 6, 7])
    assert all(first[key].equal(again[key]) for key in first)
