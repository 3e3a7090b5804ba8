"""The policy: routing inside the model, offline labels, router training, calibration, report and CLI."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from visor import VisorForConditionalGeneration, cli, presets
from visor.config import Schedule
from visor.flops import llm_prefill_flops, router_flops
from visor.modeling.router import ConfigurationRouter
from visor.policy import (
    LabelTable, Outcome, calibrate, cheapest_good, fixed_outcome, oracle_outcome, policy_report, router_outcome, sweep,
    train_router,
)
from visor.policy.api import full_model_flops, label_synthetic, load_labels_for
from visor.policy.labels import router_features
from visor.policy.calibration import THRESHOLDS
from visor.policy.report import CURVE_POINTS, against_fixed_curve, fixed_curve_accuracy, fixed_curve_mix
from visor.policy.training import fit_novelty_guard


@pytest.fixture(scope="module")
def model(open_visor_factory):
    """A tiny sparse VISOR (configurations [], [1], [1, 4]) with open gates, so the image matters."""
    torch.manual_seed(0)
    stock = LlavaOnevisionForConditionalGeneration(presets.tiny(6)).eval()
    visor = open_visor_factory(stock, trust_router=True)
    with torch.no_grad():
        for parameter in visor.router.parameters():
            parameter.normal_(0, 0.5)
    return visor


@pytest.fixture(scope="module")
def table(model):
    return label_synthetic(model, "train", per_task=3, batch_size=8, show_progress=False)


def _prompts(model, per_task=2):
    from visor.data import TASKS, VisorProcessor, build_tokenizer, make_sample

    samples = [make_sample(task, "validation", index) for task in TASKS for index in range(per_task)]
    processor = VisorProcessor(model.config, build_tokenizer(), padding_side="left")
    inputs = dict(processor([s.image for s in samples], [s.question for s in samples]))
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return inputs


def router_of(hidden_size: int, configurations: int, mode: str = "softmax", router_hidden_size: int = 256):
    """A router for `configurations` configurations (cheapest first) of a text model `hidden_size` wide."""
    config = SimpleNamespace(text_config=SimpleNamespace(hidden_size=hidden_size), router_hidden_size=router_hidden_size,
                             configurations=[list(range(size)) for size in range(configurations)], router_mode=mode,
                             router_threshold=0.5, router_novelty_references=0, router_novelty_neighbours=5,
                             router_novelty_threshold=None)
    return ConfigurationRouter(config)


def _splitting_tau(model, inputs) -> float:
    """A τ at which the (random) router sends some samples to configuration 0 and others elsewhere: midway
    between the two middle probabilities, so that no sample sits on the threshold (where the last bit of a batched
    against a one-sample matmul would decide)."""
    with torch.no_grad():
        probability = model.router.probabilities(model.router(router_features(model, inputs)))[:, 0]
    ordered = probability.sort().values
    middle = len(ordered) // 2
    assert ordered[middle - 1] < ordered[middle], "the test needs distinct probabilities in the middle"
    return float((ordered[middle - 1] + ordered[middle]) / 2)


# ---- the decision rule ------------------------------------------------------------------------------------------
def test_decision_is_the_cheapest_configuration_passing_tau():
    router = router_of(4, 3, mode="multilabel")
    logits = torch.logit(torch.tensor([[0.2, 0.6, 0.9], [0.1, 0.1, 0.1]]))
    assert router.decide(logits, 0.5).tolist() == [1, 2]  # row 2: nothing passes -> the largest
    assert router.decide(logits, 0.15).tolist() == [0, 2]
    assert router.decide(logits, 0.0).tolist() == [0, 0]


def test_samples_flagged_novel_skip_the_cheapest_configuration():
    router = router_of(4, 3, mode="multilabel")
    logits = torch.logit(torch.tensor([[0.9, 0.9, 0.9], [0.9, 0.9, 0.9], [0.9, 0.1, 0.9]]))
    novel = torch.tensor([False, True, True])
    # A flagged sample takes the cheapest passing configuration after the cheapest.
    assert router.decide(logits, 0.5, novel).tolist() == [0, 1, 2]


def test_softmax_mode_uses_cumulative_probability_cheapest_first():
    router = router_of(4, 3, mode="softmax")
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    assert router.decide(logits, 0.15).tolist() == [0]
    assert router.decide(logits, 0.6).tolist() == [1]
    assert router.decide(logits, 0.95).tolist() == [2]


def test_a_sure_router_can_still_be_thresholded():
    """Logits of 18 and 25 are both exactly 1.0 as float32 probabilities; the decision must still tell them apart."""
    router = router_of(4, 2, mode="multilabel")
    logits = torch.tensor([[18.0, 30.0], [25.0, 30.0]])
    assert torch.sigmoid(logits[:, 0]).tolist() == [1.0, 1.0]
    tau = float(torch.sigmoid(torch.tensor(25.0, dtype=torch.float64)))
    assert router.decide(logits, tau).tolist() == [1, 0]


def test_sweep_tries_every_score_where_a_decision_changes():
    """A router sure of the cheap configuration (scores above 0.999): the 0.01 grid sees one decision, the sweep
    also tries the table's own scores and so finds every mix of configurations."""
    torch.manual_seed(0)
    router = router_of(4, 2, mode="multilabel", router_hidden_size=8)
    with torch.no_grad():
        router.mlp[-1].bias.fill_(9.0)
    features = torch.randn(16, 8)
    table = LabelTable(features, torch.ones(16, 2), torch.ones(16, 2, dtype=torch.bool),
                       torch.tensor([[1, 2]]).repeat(16, 1), torch.zeros(16, 2, dtype=torch.long), ["t"] * 16,
                       ["g"] * 16)
    grid = {float(outcome.choice.float().mean()) for _, outcome in sweep(router, table, 0, thresholds=THRESHOLDS)}
    assert grid == {0.0, 1.0}  # all cheap up to 0.99, all dear at 1.0
    points = sweep(router, table, 0)
    scores = router.decision_scores(router(features)).flatten().tolist()
    assert set(scores) <= {threshold for threshold, _ in points}
    assert {int(outcome.choice.sum()) for _, outcome in points} == set(range(17))  # 0, 1, ..., 16 samples dear


@pytest.mark.parametrize("tau", [-0.1, 1.5])
def test_tau_outside_unit_interval_is_refused(model, tau):
    with pytest.raises(ValueError, match="τ must lie in"):
        model.router.decide(torch.zeros(1, 3), tau)
    with pytest.raises(ValueError, match="τ must lie in"):
        model(**_prompts(model, 1), configuration="auto", router_threshold=tau)


def test_unknown_configuration_string_is_refused(model):
    with pytest.raises(ValueError, match='"auto"'):
        model(**_prompts(model, 1), configuration="fastest")


# ---- routing inside the model -------------------------------------------------------------------------------------
def test_routing_is_deterministic_and_batch_independent(model):
    inputs = _prompts(model)
    tau = _splitting_tau(model, inputs)
    with torch.no_grad():
        first = model(**inputs, configuration="auto", router_threshold=tau).configuration
        second = model(**inputs, configuration="auto", router_threshold=tau).configuration
        alone = [model(**{k: v[i:i + 1] for k, v in inputs.items()}, configuration="auto",
                       router_threshold=tau).configuration.item() for i in range(len(first))]
    assert torch.equal(first, second)
    assert first.tolist() == alone
    assert len(set(first.tolist())) > 1, "the test needs a router that chooses differently per sample"


def test_auto_equals_running_the_chosen_configurations(model):
    inputs = _prompts(model)
    with torch.no_grad():
        routed = model(**inputs, configuration="auto", router_threshold=_splitting_tau(model, inputs))
        assert len(set(routed.configuration.tolist())) > 1
        fixed = model(**inputs, configuration=routed.configuration.tolist())
    torch.testing.assert_close(routed.logits, fixed.logits, atol=1e-5, rtol=1e-5)


def test_deciding_never_runs_a_layer_twice_for_a_sample(model):
    """Each decoder layer sees every sample exactly once (SA rows + text rows), router or not."""
    inputs = _prompts(model)
    tau = _splitting_tau(model, inputs)
    rows_seen = {index: 0 for index in range(model.config.num_layers)}
    hooks = [
        layer.register_forward_pre_hook(lambda module, args, index=index: rows_seen.__setitem__(
            index, rows_seen[index] + args[0].shape[0]))
        for index, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with torch.no_grad():
            model(**inputs, configuration="auto", router_threshold=tau)
    finally:
        for hook in hooks:
            hook.remove()
    batch = inputs["input_ids"].shape[0]
    assert rows_seen == {index: batch for index in rows_seen}


def test_generate_with_auto_reports_the_configuration(model):
    inputs = _prompts(model, 1)
    inputs.pop("position_ids")
    output = model.generate(**inputs, configuration="auto", max_new_tokens=3, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
    with torch.no_grad():
        chosen = model(**inputs, configuration="auto").configuration
    assert torch.equal(output.past_key_values.configuration, chosen)


def test_novelty_guard_is_saved_counted_and_obeyed(model, table, tmp_path):
    """Fitted on a label table, the guard travels with the saved model, its distances are counted in the router's
    FLOPs (checked with FlopCounterMode), and a sample it flags never runs the cheapest configuration."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    guarded = copy.deepcopy(model)
    kappa = fit_novelty_guard(guarded, table, quantile=0.9)
    assert guarded.config.router_novelty_references == len(table) and guarded.config.router_novelty_threshold == kappa
    guarded.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.router.novelty.references, guarded.router.novelty.references)
    assert loaded.config.router_novelty_threshold == kappa
    features = table.features[:1]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        loaded.router.route(features)
    assert counter.get_total_flops() == router_flops(loaded.config) > router_flops(model.config)
    inputs = _prompts(model)
    with torch.no_grad():
        novel = loaded.router.novel(router_features(loaded, inputs))
        # τ = 0 passes every configuration: the cheapest runs, except where the guard flags the input.
        assert loaded(**inputs, configuration="auto", router_threshold=0.0).configuration.tolist() == novel.long().tolist()
        loaded.config.router_novelty_threshold = -1.0  # everything is novel
        assert (loaded(**inputs, configuration="auto", router_threshold=0.0).configuration == 1).all()


# ---- labels ------------------------------------------------------------------------------------------------------
def test_offline_decisions_match_the_model(model, table):
    """Decisions from the table's stored features equal what the model decides at the router layer."""
    from visor.policy.labels import prompt_only
    from visor.training.synthetic import SyntheticSource

    decisions = []
    for _, _, inputs in SyntheticSource(model.config).label_batches("train", 3, batch_size=8):
        with torch.no_grad():
            decisions += model(**prompt_only(inputs), configuration="auto").configuration.tolist()
    assert router_outcome(model.router, table, 0.5, 0).choice.tolist() == decisions


def test_label_table_contents(model, table):
    from visor.data import TASKS

    samples = 3 * len(TASKS)  # per_task=3 on the standard suite: every registered task
    assert len(table) == samples and table.num_configurations == 3
    assert table.features.shape == (samples, 2 * model.config.text_config.hidden_size)
    assert ((table.probability > 0) & (table.probability <= 1)).all()
    visual, text = table.tokens[0].tolist()
    assert visual > 20 * text > 0
    assert table.flops[0].tolist() == [llm_prefill_flops(model.config, visual, text, Schedule.of(model.config, c)).total for c in range(3)]
    assert sorted(set(table.groups)) == ["easy", "hard"]


def test_label_table_round_trip_and_fingerprint(model, table, tmp_path):
    path = tmp_path / "labels.safetensors"
    table.save(path)
    loaded = load_labels_for(model, path)
    assert torch.equal(loaded.flops, table.flops) and loaded.tasks == table.tasks
    other = LabelTable.load(path)
    other.fingerprint["configurations"] = [[], [1]]
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="different model"):
        load_labels_for(model, tmp_path / "other.safetensors")


def test_good_labels_follow_the_99_percent_rule():
    probability = torch.tensor([[0.50, 0.80, 0.80], [0.90, 0.10, 0.905]])
    table = LabelTable(torch.zeros(2, 4), probability, torch.tensor([[0, 1, 1], [1, 0, 1]]).bool(),
                       torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), ["a", "b"], ["h", "e"])
    assert table.good("probability").tolist() == [[False, True, True], [True, False, True]]
    assert table.good("correct").tolist() == [[False, True, True], [True, False, True]]
    assert cheapest_good(table.good()).tolist() == [1, 0]


# ---- training, calibration, report -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["multilabel", "softmax"])
def test_router_training_fits_separable_labels(mode):
    """Features that reveal the answer: the router must learn to route easy rows cheap and hard rows dear."""
    torch.manual_seed(0)
    hard = torch.rand(64) > 0.5
    features = torch.randn(64, 8) + 3 * hard[:, None].float()
    probability = torch.stack([torch.where(hard, 0.1, 0.9), torch.full((64,), 0.9), torch.full((64,), 0.9)], dim=1)
    table = LabelTable(features, probability, probability > 0.5, torch.tensor([[1, 2, 3]]).repeat(64, 1),
                       torch.zeros(64, 2, dtype=torch.long), ["t"] * 64, ["g"] * 64)
    router = router_of(4, 3, mode=mode, router_hidden_size=16)
    losses = train_router(router, table, steps=200, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    choice = router_outcome(router, table, 0.5, 0).choice
    assert (choice[~hard] == 0).float().mean() > 0.9 and (choice[hard] == 1).float().mean() > 0.9


def test_calibration_hits_targets_and_refuses_unreachable_ones(model, table):
    cost = router_flops(model.config)
    cheapest = float(table.flops[:, 0].double().mean()) + cost
    dearest = float(table.flops[:, 2].double().mean()) + cost
    threshold, outcome = calibrate(model.router, table, cost, target_flops=(cheapest + dearest) / 2)
    assert 0 <= threshold <= 1 and outcome.mean_flops <= (cheapest + dearest) / 2
    with pytest.raises(ValueError, match="below what the router can reach"):
        calibrate(model.router, table, cost, target_flops=cheapest / 2)
    best = max(outcome.accuracy for _, outcome in sweep(model.router, table, cost))
    assert best < 100, "the random model cannot be perfect"
    with pytest.raises(ValueError, match="above what the router reaches"):
        calibrate(model.router, table, cost, target_accuracy=best + 0.5)
    _, fallback = calibrate(model.router, table, cost, target_accuracy=best + 0.5, best_if_unreachable=True)
    assert fallback.accuracy == best
    with pytest.raises(ValueError, match="percentage"):
        calibrate(model.router, table, cost, target_accuracy=101.0)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate(model.router, table, cost)


FIXED = [(10.0, 80.0), (20.0, 90.0), (40.0, 95.0)]


def test_fixed_curve_interpolates_between_configurations_and_is_flat_outside():
    assert fixed_curve_accuracy(FIXED, 15.0) == pytest.approx(85.0)
    assert fixed_curve_accuracy(FIXED, 30.0) == pytest.approx(92.5)
    assert fixed_curve_accuracy(FIXED, 5.0) == 80.0 and fixed_curve_accuracy(FIXED, 50.0) == 95.0
    assert fixed_curve_mix(FIXED, 15.0) == [(0, 0.5), (1, 0.5)]


def test_a_dearer_but_worse_configuration_does_not_lower_the_curve():
    dominated = [(10.0, 80.0), (20.0, 90.0), (40.0, 85.0)]
    assert fixed_curve_accuracy(dominated, 30.0) == pytest.approx(90.0)
    assert fixed_curve_mix(dominated, 30.0) == [(1, 0.5), (1, 0.5)]  # the dearer one counts as configuration 1


def test_gap_to_the_fixed_curve_is_paired_per_sample():
    """Configuration 1 fixes 20 of 40 samples configuration 0 gets wrong. A router that spends on exactly those
    lies 10 answers above the curve at its FLOPs (the curve mixes half and half); one that spends at random on
    half the samples lies on the curve, within its noise."""
    correct = torch.tensor([[True, True]] * 20 + [[False, True]] * 20)
    table = LabelTable(torch.zeros(40, 2), correct.float(), correct, torch.tensor([[1, 3]]).repeat(40, 1),
                       torch.zeros(40, 2, dtype=torch.long), ["t"] * 40, ["g"] * 40)
    rows = torch.arange(40)
    smart = torch.tensor([0] * 20 + [1] * 20)
    outcome = Outcome(smart, correct[rows, smart], table.flops[rows, smart])
    gap = against_fixed_curve(table, outcome, rows)
    assert gap["curve_accuracy"] == pytest.approx(75.0) and gap["curve_gap"] == pytest.approx(10.0)
    blind = torch.tensor([0, 1] * 20)
    gap = against_fixed_curve(table, Outcome(blind, correct[rows, blind], table.flops[rows, blind]), rows)
    assert gap["curve_gap"] == pytest.approx(0.0) and 0 < gap["curve_gap_noise"] < 10
    same = fixed_outcome(table, 1)
    assert against_fixed_curve(table, same, rows)["curve_gap_noise"] == 0.0


def test_report_rows_and_oracle(model, table, tmp_path):
    full = full_model_flops(model, table)
    report = policy_report(model.router, table, 0.5, router_flops(model.config), full)
    methods = {row["method"] for row in report["rows"]}
    assert methods == {"fixed-0", "fixed-1", "fixed-2", "router", "oracle"}
    overall = {row["method"]: row for row in report["rows"] if row["subset"] == "all"}
    assert overall["oracle"]["accuracy"] >= max(overall[f"fixed-{c}"]["accuracy"] for c in range(3))
    assert overall["fixed-0"]["savings"] > overall["fixed-2"]["savings"] > 1
    assert sum(overall["router"]["histogram"].values()) == len(table)
    assert {"curve_gap", "curve_gap_noise", "novel"} <= overall["router"].keys() and overall["router"]["novel"] == 0
    oracle = oracle_outcome(table)
    assert torch.equal(oracle.correct, table.correct.any(dim=1))
    assert torch.equal(fixed_outcome(table, 1).flops, table.flops[:, 1])
    curves = report["router_curves"]
    assert set(curves) == {"all"} | {f"group:{group}" for group in table.groups}
    at_zero = curves["all"][0]  # τ = 0: every sample to the cheapest configuration
    cheapest = next(row for row in report["rows"] if row["method"] == "fixed-0" and row["subset"] == "all")
    assert at_zero["threshold"] == 0 and at_zero["accuracy"] == pytest.approx(cheapest["accuracy"])
    assert len(curves["all"]) <= 2 * CURVE_POINTS
    thresholds = [point["threshold"] for point in curves["all"]]
    assert thresholds == sorted(set(thresholds)) and thresholds[-1] == 1.0  # thinned, ends at τ = 1, no repeats


def test_policy_cli_end_to_end(model, tmp_path, capsys):
    model_dir, trained = tmp_path / "model", tmp_path / "policy"
    model.save_pretrained(model_dir)
    labels = [tmp_path / f"{split}.safetensors" for split in ("train", "validation", "test")]
    for split, path in zip(("train", "validation", "test"), labels):
        assert cli.main(["policy", "label", "--model", str(model_dir), "--split", split, "--per-task", "2",
                         "--output", str(path)]) == 0
    assert cli.main(["policy", "train", "--model", str(model_dir), "--labels", str(labels[0]), "--steps", "20",
                     "--novelty-quantile", "0.98", "--output", str(trained)]) == 0
    share = float((~LabelTable.load(labels[0]).good()[:, 0]).float().mean())
    printed = capsys.readouterr().out
    assert f"is not good for {100 * share:.1f}% of the" in printed
    assert f"novelty guard: {len(LabelTable.load(labels[0]))} reference features" in printed
    dearest = float(LabelTable.load(labels[1]).flops[:, 2].double().mean()) * 2
    assert cli.main(["policy", "calibrate", "--model", str(trained), "--labels", str(labels[1]),
                     "--target-flops", str(dearest)]) == 0
    assert cli.main(["policy", "report", "--model", str(trained), "--labels", str(labels[2]),
                     "--output", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "policy.png").stat().st_size > 1000
    assert "| router | all |" in capsys.readouterr().out
    assert cli.main(["policy", "calibrate", "--model", str(trained), "--labels", str(labels[1]),
                     "--target-flops", "1"]) == 2


def test_the_router_reads_its_mode_and_tau_from_the_models_config(model, tmp_path):
    from visor import VisorConfig

    config = VisorConfig.from_stock_config(presets.tiny(6), router_mode="multilabel", router_hidden_size=16)
    router = ConfigurationRouter(config)
    assert router.mode == "multilabel" and router.num_configurations == len(config.configurations) == 3
    assert router.mlp[-1].out_features == 3 and router.mlp[0].out_features == 16
    converted = VisorForConditionalGeneration(config)
    converted.configure_router(mode="softmax", threshold=0.25)
    assert converted.router.mode == "softmax" and converted.router.threshold == 0.25
    converted.save_pretrained(tmp_path)
    loaded = VisorForConditionalGeneration.from_pretrained(tmp_path)
    assert (loaded.config.router_mode, loaded.router.threshold) == ("softmax", 0.25)
    with pytest.raises(ValueError, match="router mode must be one of"):
        converted.configure_router(mode="argmax")
    with pytest.raises(ValueError, match="τ must lie in"):
        converted.configure_router(threshold=2.0)


def test_sweep_of_a_large_table_tries_a_bounded_number_of_thresholds():
    from visor.policy.calibration import MAX_SCORE_THRESHOLDS

    torch.manual_seed(0)
    router = router_of(4, 3, mode="multilabel", router_hidden_size=8)
    rows = MAX_SCORE_THRESHOLDS  # three configurations: 3x more distinct scores than the cap
    table = LabelTable(torch.randn(rows, 8), torch.ones(rows, 3), torch.ones(rows, 3, dtype=torch.bool),
                       torch.tensor([[1, 2, 3]]).repeat(rows, 1), torch.zeros(rows, 2, dtype=torch.long),
                       ["t"] * rows, ["g"] * rows)
    points = sweep(router, table, 0)
    assert len(points) <= MAX_SCORE_THRESHOLDS + len(THRESHOLDS)
    scores = router.decision_scores(router(table.features)).flatten()
    assert min(threshold for threshold, _ in points) == 0 and float(scores.max()) in {t for t, _ in points}


def test_the_policy_loads_a_visor_model_of_any_family_and_refuses_stock_ones(model, tmp_path):
    from visor.backbones import family
    from visor.policy.api import load_model

    stock = LlavaOnevisionForConditionalGeneration(presets.tiny(2))
    stock.save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match="stock model, not a VISOR model"):
        load_model(tmp_path / "stock")
    config = presets.tiny_qwen3_vl(6)
    qwen = family(config).VISOR_MODEL.from_stock(family(config).BACKBONE.stock_model_class(config))
    qwen.save_pretrained(tmp_path / "qwen")
    loaded = load_model(tmp_path / "qwen")
    assert type(loaded) is type(qwen) and loaded.router is not None


def test_a_budget_with_a_guarantee_end_to_end(model, tmp_path, capsys):
    """label against the stock model, calibrate for a maximum loss, then report and generate say what holds."""
    from visor.data import build_tokenizer

    torch.manual_seed(0)
    stock, model_dir, trained = tmp_path / "stock", tmp_path / "model", tmp_path / "policy"
    LlavaOnevisionForConditionalGeneration(presets.tiny(6)).save_pretrained(stock)
    model.save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    labels = {split: tmp_path / f"{split}.safetensors" for split in ("train", "validation")}
    for split, path in labels.items():
        assert cli.main(["policy", "label", "--model", str(model_dir), "--split", split, "--per-task", "2",
                         "--reference-model", str(stock), "--output", str(path)]) == 0
    table = LabelTable.load(labels["validation"])
    assert table.reference.dtype == torch.bool and table.reference.shape == (len(table),)
    assert table.reference_name == f"the stock model {stock}"
    assert f"{table.reference_name} answers {100 * float(table.reference.float().mean()):.1f}%" in capsys.readouterr().out
    assert cli.main(["policy", "train", "--model", str(model_dir), "--labels", str(labels["train"]), "--steps", "20",
                     "--output", str(trained)]) == 0
    assert cli.main(["policy", "calibrate", "--model", str(trained), "--labels", str(labels["validation"]),
                     "--max-loss", "0.3", "--confidence", "0.6"]) == 0
    printed = capsys.readouterr().out
    stored = VisorForConditionalGeneration.from_pretrained(trained).config.router_guarantee
    assert stored["samples"] == len(table) and stored["reference"] == table.reference_name
    assert (stored["max_loss"], stored["confidence"]) == (0.3, 0.6)
    assert ("is certified to lose at most 30 points" if stored["certified"] else "no τ is certified") in printed
    assert cli.main(["policy", "report", "--model", str(trained), "--labels", str(labels["validation"]),
                     "--output", str(tmp_path / "report")]) == 0
    assert "Guarantee: " in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(trained), "--image", str(_an_image(tmp_path)),
                     "--question", "what color is the shape?"]) == 0
    assert "budget: " in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(trained), "--image", str(_an_image(tmp_path)),
                     "--question", "what color is the shape?", "--tau", "0.123"]) == 0
    assert "budget: " not in capsys.readouterr().out  # another τ than the certified one promises nothing
    assert cli.main(["policy", "calibrate", "--model", str(trained), "--labels", str(labels["validation"]),
                     "--target-accuracy", "0"]) == 0
    assert VisorForConditionalGeneration.from_pretrained(trained).config.router_guarantee is None


def test_a_new_tau_mode_or_router_drops_the_guarantee(model):
    model, guarantee = copy.deepcopy(model), dict(threshold=0.4)
    for change in (lambda: model.configure_router(threshold=0.3), lambda: model.configure_router(mode="multilabel"),
                   lambda: train_router(model.router, label_synthetic(model, "train", 1, show_progress=False), steps=1)):
        model.configure_router(mode="softmax", threshold=0.4, guarantee=guarantee)
        assert model.config.router_guarantee == guarantee
        change()
        assert model.config.router_guarantee is None
    with pytest.raises(ValueError, match="pass the τ it certifies"):
        model.configure_router(guarantee=guarantee)


def _an_image(folder):
    from PIL import Image

    path = folder / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def test_the_router_chooses_per_video_prompt_as_it_does_per_image(model):
    """Labels on the video suite: each clip's visual tokens and FLOPs per configuration, and the decisions the
    table's features give equal the model's own `auto` decisions on the same clips."""
    from visor.backbones import backbone_for
    from visor.policy.labels import prompt_only
    from visor.training.synthetic import SyntheticSource

    table = label_synthetic(model, "train", per_task=2, batch_size=4, suite="video", show_progress=False)
    tokens = backbone_for(model.config).video_tokens(8).visual_tokens
    assert len(table) == 8 and (table.tokens[:, 0] == tokens).all()
    visual, text = table.tokens[0].tolist()
    assert table.flops[0].tolist() == [llm_prefill_flops(model.config, visual, text, Schedule.of(model.config, c)).total
                                       for c in range(3)]
    decisions = []
    for _, _, inputs in SyntheticSource(model.config, suite="video").label_batches("train", 2, batch_size=4):
        with torch.no_grad():
            decisions += model(**prompt_only(inputs), configuration="auto").configuration.tolist()
    with torch.no_grad():
        tau = float(model.router.probabilities(model.router(table.features))[:, 0].median())
    assert router_outcome(model.router, table, 0.5, 0).choice.tolist() == decisions
    assert len(set(router_outcome(model.router, table, tau, 0).choice.tolist())) > 1  # it does choose per clip
