import pytest

from visor.training import settings as settings_module
from visor.training.settings import RECIPE_DEFAULTS, TrainingSettings, load_settings


def test_defaults_are_the_documented_ones():
    settings = TrainingSettings()
    assert settings.learning_rate == 1e-3 and settings.aux_weight == 1.0 and settings.mixed_precision == "auto"
    assert settings.configuration_weights is None


def test_precedence_recipe_yaml_flags_explicit(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 5.0e-4\nbatch_size: 8\nconfiguration_weights: [1, 2, 1]\nmixed_precision: 'no'\n")
    settings = load_settings("visor-universal", config, ["batch_size=16", "aux-weight=0.5", "mixed_precision=no"],
                             max_steps=7)
    assert settings.learning_rate == 5e-4  # YAML over the recipe default
    assert settings.batch_size == 16  # flag over YAML
    assert settings.aux_weight == 0.5 and settings.max_steps == 7
    assert settings.configuration_weights == [1.0, 2.0, 1.0]
    assert settings.mixed_precision == "no"  # a string, not YAML's boolean
    assert load_settings("visor-stage1", None, ["self_attention_layers=[4, 1]"]).self_attention_layers == [4, 1]
    assert load_settings("visor-universal").learning_rate == RECIPE_DEFAULTS["visor-universal"]["learning_rate"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learnig_rate=1"], "unknown training settings"),
        (["batch_size=two"], "batch_size"),
        (["batch_size=2.5"], "batch_size"),
        (["mixed_precision=fp8"], "mixed_precision"),
        (["learning_rate=-1"], "learning_rate"),
        (["configuration_weights=[0, 0]"], "configuration_weights"),
        (["self_attention_layers=[1.5]"], "self_attention_layers"),
        (["cross_attention_layers=3"], "cross_attention_layers"),
        (["no_equals_sign"], "key=value"),
        (["max_grad_norm=nan"], "max_grad_norm must be finite, got nan"),
        (["pool_strides=[1, .inf]"], "pool_strides must be finite"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_settings("full", None, overrides)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_settings("full", tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings("full", listing)


def test_micro_batch_must_split_evenly():
    settings = TrainingSettings(batch_size=12, gradient_accumulation_steps=2)
    assert settings.micro_batch_size(2) == 3
    with pytest.raises(ValueError, match="does not split"):
        settings.micro_batch_size(5)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(settings_module, "native_bf16", lambda device: native)
    assert TrainingSettings().precision_on("cpu") == ("bf16" if native else "no")
    assert TrainingSettings(mixed_precision="no").precision_on("cpu") == "no"
    assert TrainingSettings(mixed_precision="bf16").precision_on("cuda") == "bf16"


def test_settings_made_in_python_refuse_non_finite_numbers_too():
    with pytest.raises(ValueError, match="weight_decay must be finite, got nan"):
        TrainingSettings(weight_decay=float("nan"))
