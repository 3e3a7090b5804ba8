"""The report's verdicts: the policy against the fixed-configuration curve, baselines, targets."""


from visor.demo.report import (at_or_below_majority, policy_curve_verdicts, router_curve_verdicts, setting_order,
                               verdicts)

FIXED = [(10.0, 80.0), (20.0, 90.0), (40.0, 95.0)]


def _rows(group: str, router: tuple[float, float], savings: float = 2.0) -> list[dict]:
    def row(method, gflops, accuracy, histogram):
        return dict(subset=f"group:{group}", method=method, mean_llm_prefill_flops=gflops * 1e9, accuracy=accuracy,
                    savings=savings, histogram=histogram, samples=10)

    return [row(f"fixed-{i}", f, a, {str(i): 10}) for i, (f, a) in enumerate(FIXED)] + [
        row("router", *router, {"0": 5, "1": 5}), row("oracle", 15.0, 96.0, {"0": 10})]


def test_verdicts_say_below_and_not_fewer_when_so():
    rows = _rows("hard", (15.0, 84.0)) + _rows("easy", (30.0, 99.0))
    lines = policy_curve_verdicts(rows, "test split")
    hard = next(line for line in lines if "hard tasks:" in line)
    easy = next(line for line in lines if "easy tasks:" in line)
    assert "BELOW" in hard and "85.00%" in hard and "by 0.1 of 10 answers" in hard
    assert "on or above" in easy
    assert "NOT fewer" in lines[-1]
    assert "beyond the cheapest configuration (router included): easy 20.0000, hard 5.0000" in lines[-1]


def test_verdicts_weigh_a_gap_against_its_sampling_noise_and_name_flagged_samples():
    rows = _rows("hard", (15.0, 84.0))
    router = next(row for row in rows if row["method"] == "router")
    router.update(curve_gap_noise=0.5, novel=3)
    line = policy_curve_verdicts(rows, "test split")[0]
    assert "BELOW the fixed curve by 0.1 of 10 answers, within sampling noise (±0.5 at 95%)" in line
    assert "; 3 flagged novel)" in line
    router.update(curve_gap_noise=0.03)
    assert "beyond sampling noise (±0.03 at 95%)" in policy_curve_verdicts(rows, "test split")[0]
    tie = _rows("easy", (15.0, 85.0 + 1e-14))  # on the curve up to the rounding of float sums
    next(row for row in tie if row["method"] == "router").update(curve_gap_noise=0.0)
    assert "by 0.0 of 10 answers, within sampling noise (±0.0 at 95%)" in policy_curve_verdicts(tie, "variants")[0]


def test_verdicts_say_fewer_flops_on_easy_when_so():
    lines = policy_curve_verdicts(_rows("hard", (30.0, 93.0)) + _rows("easy", (12.0, 90.0)), "variants")
    assert "on or above" in lines[0] and lines[-1].startswith("Policy on the variants: fewer")


def test_curve_verdicts_count_thresholds_on_or_above_and_the_extremes():
    curves = {"group:hard": [dict(threshold=t, accuracy=a, mean_llm_prefill_flops=f * 1e9)
                             for t, (f, a) in enumerate([(10.0, 80.0), (15.0, 90.0), (30.0, 90.5), (40.0, 95.0)])]}
    line, = router_curve_verdicts(_rows("hard", (15.0, 90.0)), curves, "test split")
    # The fixed curve is 80 / 85 / 92.5 / 95 at those FLOPs: gaps 0, +0.5, -0.2, 0 answers of 10.
    assert "on or above the fixed curve at 3 of 4 thresholds" in line
    assert "largest gain 0.5 of 10 answers (at 15.0000 GFLOPs), largest shortfall 0.2 (at 30.0000)" in line


def test_a_baseline_stuck_at_its_strongest_reduction_is_named_by_its_weakest_setting():
    def row(method, setting, accuracy, savings):
        return dict(method=method, setting=setting, group="hard", accuracy=accuracy, savings=savings)

    groups = [row("full", "all tokens", 95.0, 1.0), row("visor-policy", "auto", 94.0, 10.8),
              row("fastv", "11x", 86.0, 2.61), row("fastv", "2x", 82.0, 2.0), row("fastv", "4x", 86.0, 2.61),
              row("pool", "11x", 12.0, 11.8), row("pool", "8x", 13.0, 8.02)]
    lines = verdicts(dict(groups=groups, stages={}))
    assert any(line.startswith("fastv at 4x (2.61x, nearest") for line in lines)
    assert any(line.startswith("pool at 11x (11.80x, nearest") for line in lines)


def test_each_baseline_is_held_against_the_majority_class():
    def task(method, name, accuracy, majority):
        return dict(method=method, setting="4x", task=name, group="hard", accuracy=accuracy, majority=majority)

    rows = [task("hired", "read_cell", 13.0, 13.0), task("hired", "bar_value", 40.0, 18.0),
            task("pool", "read_cell", 14.0, 13.0), task("pool", "bar_value", 19.0, 18.0)]
    assert at_or_below_majority(dict(rows=rows), ("hired", "4x")) == (["read_cell"], 2)
    assert at_or_below_majority(dict(rows=rows), ("pool", "4x"), "hard") == ([], 2)
    groups = [dict(method=m, setting=s, group="hard", accuracy=a, savings=r)
              for m, s, a, r in (("visor-policy", "auto", 94.0, 10.8), ("hired", "4x", 26.5, 4.0))]
    (line,) = [line for line in verdicts(dict(rows=rows, groups=groups, stages={})) if line.startswith("hired")]
    assert "at or below the majority class on 1 of 2" in line


def test_the_full_model_target_counts_every_task_of_the_group():
    def row(task, group, accuracy):
        return dict(method="full", setting="all tokens", task=task, group=group, accuracy=accuracy)

    rows = [row("read_cell", "hard", 96.5), row("count_marks", "hard", 79.5), row("easy_vqa", "easy", 97.0)]
    hard, easy = verdicts(dict(rows=rows, groups=[], stages={}))
    assert hard == "full model on every hard task >= 80% (read_cell 96.5%, count_marks 79.5%): NOT met."
    assert easy == "full model on every easy task >= 95% (easy_vqa 97.0%): met."


def test_ratio_settings_sort_by_number_before_other_settings():
    settings = ["SA [1]", "11x", "2x", "auto", "12.6x", "4x"]
    assert sorted(settings, key=setting_order) == ["2x", "4x", "11x", "12.6x", "SA [1]", "auto"]
