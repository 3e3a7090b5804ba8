"""`visor generate`: one question answered by a saved model, with the configuration that ran and its FLOPs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from visor import cli, presets
from visor.data import build_tokenizer
from visor.config import Schedule
from visor.flops import llm_prefill_flops, router_flops
from visor.generate import answer


@pytest.fixture(scope="module")
def saved(open_visor_factory, saver):
    """A tiny stock model and its VISOR conversion (open gates, random router), each saved with a tokenizer."""
    torch.manual_seed(0)
    stock = LlavaOnevisionForConditionalGeneration(presets.tiny(6)).eval()
    visor = open_visor_factory(stock, trust_router=True)
    folders = saver(dict(stock=stock, visor=visor), build_tokenizer())
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    return folders, visor.config, image


def test_fixed_configuration_reports_its_layers_and_flops(saved):
    folders, config, image = saved
    for index, layers in enumerate(config.configurations):
        result = answer(folders["visor"], image, "what color dominates the image ?", configuration=index,
                        max_new_tokens=2)
        assert result["configuration"] == index and list(result["self_attention_layers"]) == list(layers)
        expected = llm_prefill_flops(config, result["visual_tokens"], result["text_tokens"], Schedule.of(config, index)).total
        assert result["llm_prefill_flops"] == expected < result["full_flops"]


def test_auto_counts_the_router_and_picks_a_valid_configuration(saved):
    folders, config, image = saved
    for tau in (0.0, 1.0):
        result = answer(folders["visor"], image, "what color dominates the image ?", tau=tau, max_new_tokens=2)
        ran = result["configuration"]
        assert 0 <= ran < len(config.configurations)
        expected = llm_prefill_flops(config, result["visual_tokens"], result["text_tokens"], Schedule.of(config, ran)).total
        assert result["llm_prefill_flops"] == expected + router_flops(config)
    # τ = 1 demands certainty no router gives: the largest configuration runs.
    assert result["configuration"] == config.largest_configuration


def test_stock_model_answers_at_full_cost(saved):
    folders, _, image = saved
    result = answer(folders["stock"], image, "what color dominates the image ?", max_new_tokens=2)
    assert result["configuration"] == "full" and result["llm_prefill_flops"] == result["full_flops"]


def test_cli_prints_answer_configuration_and_flops(saved, tmp_path, capsys):
    folders, _, image = saved
    path = tmp_path / "image.png"
    image.save(path)
    assert cli.main(["generate", "--model", str(folders["visor"]), "--image", str(path), "--question",
                     "what color dominates the image ?", "--configuration", "0", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "configuration: 0" in out and "GFLOPs" in out


@pytest.mark.parametrize("options, message", [
    (dict(configuration="7"), "does not exist"),
    (dict(configuration="big"), "'auto' or an index"),
    (dict(tau=1.5), "must lie in [0, 1]"),
    (dict(configuration="1", tau=0.5), "applies to configuration 'auto' only"),
])
def test_bad_options_are_clear_errors(saved, tmp_path, capsys, options, message):
    folders, _, image = saved
    path = tmp_path / "image.png"
    image.save(path)
    argv = ["generate", "--model", str(folders["visor"]), "--image", str(path), "--question", "what ?"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_model_folder_without_tokenizer_is_a_clear_error(saved, tmp_path):
    folders, _, image = saved
    bare = tmp_path / "bare"
    LlavaOnevisionForConditionalGeneration(presets.tiny(2)).save_pretrained(bare)
    with pytest.raises(ValueError, match="no tokenizer"):
        answer(bare, image, "what ?")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """An animated GIF of 6 frames, each a different colour."""
    path = tmp_path_factory.mktemp("video") / "clip.gif"
    frames = [Image.new("RGB", (64, 64), (40 * index, 200 - 30 * index, 90)) for index in range(6)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def test_a_video_is_answered_with_its_visual_tokens_and_flops(saved, clip):
    from visor.backbones import backbone_for

    folders, config, image = saved
    frames = 4
    tokens = backbone_for(config).video_tokens(frames).visual_tokens
    alone = answer(folders["visor"], None, "what color dominates the image ?", configuration=0, max_new_tokens=2,
                   video=clip, frames=frames)
    assert alone["visual_tokens"] == tokens
    assert alone["llm_prefill_flops"] == llm_prefill_flops(config, tokens, alone["text_tokens"], Schedule.of(config, 0)).total
    both = answer(folders["visor"], image, "what color dominates the image ?", configuration=0, max_new_tokens=2,
                  video=clip, frames=frames)
    image_only = answer(folders["visor"], image, "what color dominates the image ?", configuration=0, max_new_tokens=2)
    assert both["visual_tokens"] == image_only["visual_tokens"] + tokens
    stock = answer(folders["stock"], None, "what color dominates the image ?", max_new_tokens=2, video=clip,
                   frames=frames)
    assert stock["configuration"] == "full" and stock["visual_tokens"] == tokens


def test_cli_answers_a_video(saved, clip, capsys):
    folders, _, _ = saved
    assert cli.main(["generate", "--model", str(folders["visor"]), "--video", str(clip), "--frames", "3",
                     "--question", "what color dominates the image ?", "--configuration", "0",
                     "--max-new-tokens", "2"]) == 0
    assert "answer:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "give an image (--image), a video (--video) or both"),
    (["--image", "IMAGE", "--frames", "4"], "--frames samples a video"),
    (["--video", "CLIP", "--frames", "0"], "--frames must be at least 1"),
])
def test_video_options_are_clear_errors(saved, clip, tmp_path, capsys, argv, message):
    folders, _, image = saved
    path = tmp_path / "image.png"
    image.save(path)
    argv = [{"IMAGE": str(path), "CLIP": str(clip)}.get(item, item) for item in argv]
    assert cli.main(["generate", "--model", str(folders["visor"]), "--question", "what ?", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("preset, tokens", [
    ("tiny-qwen2.5-vl", {None: 3 * 16, 3: 2 * 16}),  # every frame, else 3 (2 temporal patches)
    ("tiny-qwen3-vl", {None: 2 * 16, 6: 3 * 16}),  # 4 frames (2 a second of 24, at least 4), else all 6
])
def test_a_qwen_vl_video_is_answered_with_its_grid_s_tokens(saver, clip, capsys, preset, tokens):
    """A tiny stock Qwen2.5-VL (Qwen3-VL) and its VISOR conversion (open gates) answer a video: the frames its
    stock video processor keeps unless --frames says, the video's tokens its grid's merged patches (whole temporal
    patches of 4 x 4 merged patches: frames of whole merged patches keep their size)."""
    from visor.backbones import backbone_for, family

    config = presets.PRESETS[preset](4)
    torch.manual_seed(0)
    stock = backbone_for(config).stock_model_class(config).eval()
    visor = family(config).VISOR_MODEL.from_stock(stock).eval()
    with torch.no_grad():
        for block in visor.cross_attention.values():
            block.attention_gate.fill_(0.8)
    folders = saver(dict(qwen_stock=stock, qwen_visor=visor), build_tokenizer())
    for frames, count in tokens.items():
        full = answer(folders["qwen_stock"], None, "what color ?", max_new_tokens=2, video=clip, frames=frames)
        assert full["configuration"] == "full" and full["visual_tokens"] == count
        sparse = answer(folders["qwen_visor"], None, "what color ?", configuration=0, max_new_tokens=2, video=clip,
                        frames=frames)
        assert sparse["visual_tokens"] == count
        assert sparse["llm_prefill_flops"] == llm_prefill_flops(visor.config, count, sparse["text_tokens"],
                                                                Schedule.of(visor.config, 0)).total
    assert cli.main(["generate", "--model", str(folders["qwen_visor"]), "--video", str(clip), "--question",
                     "what color ?", "--configuration", "0", "--max-new-tokens", "2"]) == 0
    assert "answer:" in capsys.readouterr().out
