"""`visor convert`: a stock folder becomes a VISOR folder that loads strictly, keeps every stock tensor, carries
the tokenizer, chat template and processor settings, equals the stock model in `--dense`, and converts in one
copy of the weights."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visor import VisorForConditionalGeneration, cli, presets
from visor.backbones import family
from visor.data import build_tokenizer

SHAPES = ("tiny", "tiny-qwen2.5-vl", "tiny-internvl3")
SCRIPTS = Path(__file__).parents[1] / "scripts"


def save_stock(folder, preset: str = "tiny", dtype=torch.float32, seed: int = 0):
    """A seeded random-weight stock checkpoint of `preset`'s shapes, with the tiny tokenizer (and its chat
    template) and a processor settings file next to it, as a downloaded checkpoint has."""
    config = presets.PRESETS[preset]()
    torch.manual_seed(seed)
    family(config).BACKBONE.stock_model_class(config).to(dtype).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "from the checkpoint"}))
    return folder


@pytest.fixture(scope="module", params=SHAPES)
def stock_folder(request, tmp_path_factory):
    return save_stock(tmp_path_factory.mktemp(request.param) / "stock", request.param)


def _convert(stock, output, *extra) -> None:
    assert cli.main(["convert", "--model", str(stock), "--output", str(output), *extra]) == 0


def _stock_model(folder):
    config = json.loads((folder / "config.json").read_text())
    return family(type("Config", (), config)).BACKBONE.stock_model_class.from_pretrained(folder).eval()


def test_conversion_keeps_every_stock_tensor_and_starts_the_new_modules_as_no_ops(stock_folder, tmp_path):
    _convert(stock_folder, tmp_path / "visor")
    stock = _stock_model(stock_folder)
    visor_class = family(stock.config).VISOR_MODEL
    model = visor_class.from_pretrained(tmp_path / "visor")  # strict: every tensor there, none extra
    converted = model.state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(converted[name], tensor), name
    assert model.config.cross_attention_layers and model.router is not None and not model.router.trained
    for block in model.cross_attention.values():
        assert torch.equal(block.attention_gate, torch.zeros_like(block.attention_gate))
        assert torch.equal(block.text_norm.weight, torch.ones_like(block.text_norm.weight))
    assert not model.position_encoding.conv.weight.any() and not model.position_encoding.conv.bias.any()
    for name in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (tmp_path / "visor" / name).is_file(), name


def test_dense_conversion_equals_the_stock_model_after_save_and_load(stock_folder, tmp_path):
    _convert(stock_folder, tmp_path / "dense", "--dense")
    stock = _stock_model(stock_folder)
    dense = family(stock.config).VISOR_MODEL.from_pretrained(tmp_path / "dense").eval()
    assert dense.config.cross_attention_layers == [] and dense.config.configurations == [list(range(6))]
    input_ids = torch.tensor([[1, 7, 9, 11, 13, 15]])  # text only: the same for every family
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=input_ids).logits, stock(input_ids=input_ids).logits,
                                   atol=1e-5, rtol=0)


def test_the_schedule_and_host_start_are_the_ones_asked_for(tmp_path):
    stock_folder = save_stock(tmp_path / "stock")
    _convert(stock_folder, tmp_path / "visor", "--cross-attention-layers", "2", "--self-attention-layers", "3,5",
             "--cross-attention-heads", "1", "--cross-attention-init", "host")
    model = VisorForConditionalGeneration.from_pretrained(tmp_path / "visor")
    assert model.config.cross_attention_layers == [2] and model.config.configurations == [[], [3], [3, 5]]
    block, host = model.cross_attention["2"], model.text_stack.layers[2].self_attn
    text = model.config.text_config
    assert block.k_proj.out_features == text.hidden_size // text.num_attention_heads  # one key/value head
    assert torch.equal(block.q_proj.weight, host.q_proj.weight)


@pytest.mark.parametrize("extra, message", [
    (["--dense", "--cross-attention-layers", "1"], "--dense has no CA blocks"),
    (["--cross-attention-layers", "9"], "out of range"),
    (["--cross-attention-heads", "3"], "positive divisor"),
])
def test_bad_conversions_are_refused_before_writing(tmp_path, capsys, extra, message):
    stock_folder = save_stock(tmp_path / "stock")
    assert cli.main(["convert", "--model", str(stock_folder), "--output", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["stock"]


def test_a_visor_folder_is_not_converted_again(tmp_path, capsys):
    stock_folder = save_stock(tmp_path / "stock")
    _convert(stock_folder, tmp_path / "visor")
    assert cli.main(["convert", "--model", str(tmp_path / "visor"), "--output", str(tmp_path / "again")]) == 2
    assert "already a VISOR checkpoint" in capsys.readouterr().err


def test_converting_real_shapes_holds_one_copy_of_the_weights(tmp_path):
    """LLaVA-OV-0.5B shapes in bf16 (1.7 GiB on disk): the conversion's peak memory, beyond what importing the
    libraries takes, is at most 1.3x the checkpoint (benchmarks/convert: 1.05x, and 2.05x for loading the stock
    model first). The measuring helpers are the benchmark's own (scripts/convert_memory.py)."""
    spec = importlib.util.spec_from_file_location("convert_memory", SCRIPTS / "convert_memory.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    stock_folder = benchmark.save_random_stock(tmp_path / "stock", "llava-ov-0.5b", torch.bfloat16)
    size = sum(path.stat().st_size for path in stock_folder.glob("*.safetensors"))
    baseline, _ = benchmark.peak_rss_of(benchmark.IMPORT_BASELINE)
    converted, _ = benchmark.peak_rss_of([sys.executable, "-m", "visor.cli", "convert", "--model", str(stock_folder),
                                          "--output", str(tmp_path / "visor")])
    ratio = (converted - baseline) / size
    print(f"conversion peak above the import baseline: {ratio:.2f}x the checkpoint's size")
    assert ratio <= 1.3, f"{converted / 2**30:.2f} GiB for {size / 2**30:.2f} GiB of weights"
    weights = load_file(tmp_path / "visor" / "model.safetensors")
    assert any(name.startswith("cross_attention.") for name in weights)
