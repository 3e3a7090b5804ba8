"""The recipes in-process: what trains, which configurations are visited, and bad input stopped up front."""

import json

import pytest
import torch

from visor import VisorForConditionalGeneration
from visor.training import train
from visor.modeling.freezing import trainable_parameter_names
from visor.training.recipes import build_model, configuration_for_step, load_checkpoint
from visor.training.settings import TrainingSettings

from training_helpers import fast_settings


def test_stage1_changes_only_the_new_parameters(tmp_path, tiny_full_checkpoint, toy_path):
    summary = train("visor-stage1", toy_path, tmp_path, fast_settings("visor-stage1", max_steps=3, learning_rate=1e-2),
                    init=tiny_full_checkpoint, progress=False)
    assert summary["visits"] == {"2": 3}  # the largest configuration ([1, 4]) every step
    stock = load_checkpoint(tiny_full_checkpoint).state_dict()
    trained = load_checkpoint(tmp_path / "model").state_dict()
    new = [name for name in trained if name.startswith(("cross_attention.", "position_encoding."))]
    assert new and set(new) <= set(trained) - set(stock)
    for name, value in stock.items():
        assert torch.equal(trained[name], value), f"base weight {name} changed in stage 1"
    converted = VisorForConditionalGeneration.from_stock(
        load_checkpoint(tiny_full_checkpoint), cross_attention_init="host", cross_attention_gate=False
    ).state_dict()  # the stage-1 recipe's default start
    assert set(converted) == set(trained)
    changed = [name for name in new if not torch.equal(trained[name], converted[name])]
    assert any(name.startswith("cross_attention.") for name in changed)
    assert any(name.startswith("position_encoding.") for name in changed)


def test_stage1_trains_only_ca_blocks_and_cpe(tiny_full_checkpoint):
    model = build_model("visor-stage1", tiny_full_checkpoint, None, fast_settings("visor-stage1"))
    names = trainable_parameter_names(model)
    assert names and all(name.startswith(("cross_attention.", "position_encoding.")) for name in names)
    assert any(name.startswith("position_encoding.") for name in names)


def test_stage1_converts_with_fewer_cross_attention_heads_when_asked(tiny_full_checkpoint):
    settings = fast_settings("visor-stage1", cross_attention_key_value_heads=1)
    model = build_model("visor-stage1", tiny_full_checkpoint, None, settings)
    assert model.config.cross_attention_key_value_heads == 1
    assert all(block.num_key_value_heads == 1 for block in model.cross_attention.values())


def test_stage1_converts_with_the_schedule_asked_for(tmp_path, tiny_full_checkpoint):
    settings = fast_settings("visor-stage1", cross_attention_layers=[3, 0], self_attention_layers=[2])
    model = build_model("visor-stage1", tiny_full_checkpoint, None, settings)
    assert model.config.cross_attention_layers == [0, 3] and model.config.configurations == [[], [2]]
    model.save_pretrained(tmp_path)
    assert build_model("visor-stage1", tmp_path, None, settings).config.configurations == [[], [2]]  # resuming
    with pytest.raises(ValueError, match="shape differs from the settings.*self_attention_layers"):
        build_model("visor-stage1", tmp_path, None, fast_settings("visor-stage1", self_attention_layers=[1]))


def test_stage1_with_closed_gates_trains_the_gates(tmp_path, tiny_full_checkpoint, toy_path):
    settings = fast_settings("visor-stage1", max_steps=2, learning_rate=1e-2, cross_attention_init="zero",
                             cross_attention_gate=True)
    train("visor-stage1", toy_path, tmp_path, settings, init=tiny_full_checkpoint, progress=False)
    gates = {name: value for name, value in load_checkpoint(tmp_path / "model").state_dict().items()
             if name.endswith("attention_gate")}
    assert gates and all(value.abs().sum() > 0 for value in gates.values())


def test_universal_visits_every_configuration(tmp_path, tiny_full_checkpoint, toy_path):
    summary = train("visor-universal", toy_path, tmp_path, fast_settings("visor-universal", max_steps=12),
                    init=tiny_full_checkpoint,
                    progress=False)
    visits = summary["visits"]
    assert set(visits) == {"0", "1", "2"} and sum(visits.values()) == 12
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in logged if "configuration" in record]
    assert {record["configuration"] for record in steps} == {0, 1, 2}
    assert steps[-1]["visits"] == visits
    validation = json.loads((tmp_path / "validation.json").read_text())[-1]
    assert set(validation["accuracy"]) == {"0", "1", "2"}  # accuracy per task at every configuration
    assert set(validation["accuracy"]["0"]) == {"colour", "where", "mean"}


def test_configuration_sampling_is_pure_and_weighted(tiny_full_checkpoint):
    model = VisorForConditionalGeneration.from_stock(load_checkpoint(tiny_full_checkpoint))
    settings = TrainingSettings(configuration_weights=[0, 1, 3])
    draws = [configuration_for_step("visor-universal", model, settings, step) for step in range(400)]
    assert draws == [configuration_for_step("visor-universal", model, settings, step) for step in range(400)]
    assert 0 not in draws and 250 < draws.count(2) < 350


@pytest.mark.parametrize(
    "recipe, source, overrides, message",
    [
        ("fine-tune", "preset", {}, "unknown recipe"),
        ("full", "missing", {}, "does not exist"),
        ("full", "corrupt-config", {}, "corrupt config.json"),
        ("full", "corrupt-weights", {}, "cannot load"),
        ("full", "empty-folder", {}, "no config.json"),
        ("full", "unknown-preset", {}, "unknown preset"),
        ("visor-stage1", "preset", {}, "starts from a checkpoint"),
        ("visor-universal", "checkpoint", {"configuration_weights": [1.0, 1.0]}, "3 configurations"),
        ("visor-stage1", "checkpoint", {"stage1_configuration": 7}, "out of range"),
        ("visor-universal", "bad-visor-config", {}, "cannot load a VISOR checkpoint"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, tiny_full_checkpoint, toy_path, recipe, source, overrides, message):
    init, preset = None, None
    if source == "preset":
        preset = "tiny"
    elif source == "unknown-preset":
        preset = "huge"
    elif source == "checkpoint":
        init = tiny_full_checkpoint
    elif source == "missing":
        init = tmp_path / "nowhere"
    else:
        init = tmp_path / source
        init.mkdir()
        if source == "corrupt-config":
            (init / "config.json").write_text("{not json")
        elif source == "corrupt-weights":
            (init / "config.json").write_text((tiny_full_checkpoint / "config.json").read_text())
            (init / "model.safetensors").write_bytes(b"\x00" * 100)
        elif source == "bad-visor-config":
            visor = VisorForConditionalGeneration.from_stock(load_checkpoint(tiny_full_checkpoint))
            visor.save_pretrained(init)
            config = json.loads((init / "config.json").read_text())
            config["configurations"] = [[1], [1, 5]]  # layer 5 is not an SA candidate
            (init / "config.json").write_text(json.dumps(config))
    output = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(recipe, toy_path, output, fast_settings(max_steps=2, **overrides), init=init, model_preset=preset,
              progress=False)
    assert not (output / "checkpoints").exists() and not (output / "metrics.jsonl").exists()


def test_data_spec_that_matches_nothing_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="matches nothing"):
        train("full", "imagenet", tmp_path / "run", fast_settings(max_steps=2), model_preset="tiny", progress=False)
    assert not (tmp_path / "run").exists()


def test_from_scratch_full_model_starts_with_2d_positions_and_scaled_embeddings():
    from visor.training.recipes import sincos_2d

    model = build_model("full", None, "tiny", TrainingSettings(model_layers=2, embedding_std=0.3))
    positions = model.model.vision_tower.embeddings.position_embedding.weight
    side = int(positions.shape[0] ** 0.5)
    assert torch.equal(positions, sincos_2d(side, positions.shape[1]))
    assert model.get_input_embeddings().weight.std().item() == pytest.approx(0.3, rel=0.05)
    default = build_model("full", None, "tiny", TrainingSettings(model_layers=2, embedding_std=None))
    assert default.get_input_embeddings().weight.std().item() < 0.05
    codes = sincos_2d(8, 64)
    gram = codes @ codes.T
    off_diagonal = gram - torch.diag(torch.diag(gram))
    assert off_diagonal.max() < 0.7 * gram.diag().min(), "distinct patches get clearly distinct codes"
    with pytest.raises(ValueError, match="embedding_std"):
        TrainingSettings(embedding_std=0.0)


def test_a_from_scratch_internvit_starts_with_2d_patch_positions_and_its_cls_position_untouched():
    from visor.training.recipes import sincos_2d

    model = build_model("full", None, "tiny-internvl3", TrainingSettings(model_layers=2))
    positions = model.model.vision_tower.embeddings.position_embeddings[0]
    assert torch.equal(positions[1:], sincos_2d(8, positions.shape[1]))
    assert not positions[0].any()  # the stock initialisation's


@pytest.mark.parametrize("recipe", ["full", "visor-universal"])
def test_a_fixed_vision_tower_gets_no_gradient_and_everything_else_trains(tiny_full_checkpoint, recipe):
    model = build_model(recipe, tiny_full_checkpoint, None, fast_settings(recipe, freeze_vision_tower=True))
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    assert frozen and all(".vision_tower." in f".{name}" for name in frozen)
    assert len(frozen) == sum(1 for name, _ in model.named_parameters() if ".vision_tower." in f".{name}")
    default = build_model(recipe, tiny_full_checkpoint, None, fast_settings(recipe))
    assert all(parameter.requires_grad for parameter in default.parameters())


def _toy_batch(model, toy_path, size=4):
    from visor.training.data import resolve_data

    return resolve_data(toy_path, model.config, 0).train_batch(list(range(size)))


@pytest.mark.parametrize("recipe", ["full", "visor-universal"])
def test_the_loss_on_labelled_positions_only_is_the_models_own_loss(recipe, tiny_full_checkpoint, toy_path):
    """TrainingModule makes logits only where a labelled token is predicted; loss and gradients are those of the
    model's own `labels=` loss over every position (a batch whose answers sit at different positions)."""
    from visor.training.recipes import MODEL_INPUTS, TrainingModule, labelled_predictions

    model = build_model(recipe, tiny_full_checkpoint, None, fast_settings(recipe, aux_weight=0.0))
    batch = _toy_batch(model, toy_path)
    predicting = labelled_predictions(batch["labels"])
    assert 0 < len(predicting) < batch["input_ids"].shape[1] - 1  # image positions are left out
    configuration = None if recipe == "full" else 1
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    options = {} if configuration is None else dict(configuration=configuration)
    own = model(**inputs, **options, use_cache=False).loss
    own.backward()
    own_gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, answer_loss, _ = TrainingModule(model)(batch, configuration)
    loss.backward()
    torch.testing.assert_close(loss, own, atol=1e-6, rtol=1e-6)
    assert set(own_gradients) == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, own_gradients[name], atol=1e-6, rtol=1e-5, msg=name)


def test_pooled_training_at_stride_1_is_the_plain_loss_and_labels_follow_the_tokens(tiny_full_checkpoint, toy_path):
    """The pooled path repacks the prompt (fewer image slots, left padding): its labels move with their tokens,
    so at stride 1 (nothing pooled) the loss is the plain one, and at stride 2 every answer token still counts."""
    from visor.reduction.pool import pool
    from visor.training.recipes import TrainingModule

    model = build_model("full", tiny_full_checkpoint, None, fast_settings("full", aux_weight=0.0))
    module = TrainingModule(model)
    batch = _toy_batch(model, toy_path)
    plain, _, _ = module(batch)
    same, _, _ = module(batch, None, 1.0)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "labels")}
    pooled = pool(model, 2.0).model_inputs(**inputs)
    assert torch.equal((pooled["labels"] != -100).sum(dim=1), (batch["labels"] != -100).sum(dim=1))
    assert pooled["inputs_embeds"].shape[1] < batch["input_ids"].shape[1]
    loss, _, _ = module(batch, None, 2.0)
    loss.backward()  # the projector and the vision tower learn from the pooled tokens too
    projector = model.model.multi_modal_projector.linear_1.weight.grad
    tower = next(p for name, p in model.named_parameters() if "vision_tower" in name and p.grad is not None)
    assert projector is not None and projector.abs().sum() > 0 and tower.grad.abs().sum() > 0


def test_pool_strides_are_drawn_per_step_logged_and_validated(tmp_path, tiny_full_checkpoint, toy_path):
    from visor.training.recipes import pool_stride_for_step

    settings = fast_settings("full", max_steps=6, pool_strides=[1, 2, 4], aux_weight=0.0)
    draws = [pool_stride_for_step(settings, step) for step in range(300)]
    assert draws == [pool_stride_for_step(settings, step) for step in range(300)]
    assert all(70 < draws.count(stride) < 130 for stride in (1, 2, 4))
    assert pool_stride_for_step(fast_settings("full"), 3) is None
    train("full", toy_path, tmp_path, settings, init=tiny_full_checkpoint, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    strides = [record["pool_stride"] for record in logged if "pool_stride" in record]
    assert strides == [pool_stride_for_step(settings, step) for step in range(1, 7)]
    validation = json.loads((tmp_path / "validation.json").read_text())[-1]
    assert set(validation["accuracy"]) == {"pool 1", "pool 2", "pool 4"}  # the model read as it was trained


@pytest.mark.parametrize("overrides, message", [
    (dict(pool_strides=[]), "non-empty list of strides >= 1"),
    (dict(pool_strides=[0.5, 2]), "non-empty list of strides >= 1"),
])
def test_bad_pool_strides_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingSettings(**overrides)


def test_pool_strides_belong_to_the_full_recipe(tmp_path, tiny_full_checkpoint, toy_path):
    with pytest.raises(ValueError, match="recipe 'full' only"):
        train("visor-stage1", toy_path, tmp_path, fast_settings("visor-stage1", max_steps=1, pool_strides=[2]),
              init=tiny_full_checkpoint, progress=False)


def test_pool_strides_need_a_family_the_pooling_reads(tmp_path):
    """Pooling reads LLaVA-OV's anyres grids: on a Qwen-VL model the setting is refused before any step."""
    from visor import presets
    from visor.backbones import backbone_for
    from visor.training.recipes import check_configurations

    config = presets.PRESETS["tiny-qwen2.5-vl"]()
    model = backbone_for(config).stock_model_class(config)
    with pytest.raises(ValueError, match="not ported to"):
        check_configurations(model, "full", fast_settings("full", pool_strides=[2]))
