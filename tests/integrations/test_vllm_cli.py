"""`visor serve`'s command line for vLLM (`visor.integrations.vllm.cli.server_command`), which needs no vLLM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from released_checkpoints import write_open_visor_checkpoint  # noqa: E402

import pytest  # noqa: E402

from visor.data.processor import folder_chat_template  # noqa: E402
from visor.integrations.vllm.cli import server_command  # noqa: E402


def test_the_folder_chat_template_is_handed_to_vllm(tmp_path):
    """vLLM reads no chat_template.json of a model type it does not know: the server gets it on its command line,
    unless the user gives one."""
    folder, _ = write_open_visor_checkpoint("qwen2.5-vl", tmp_path)
    template = folder_chat_template(folder)
    assert template and "<|vision_start|>" in template
    argv = server_command(str(folder), 0, vllm_options=["--", "--max-num-seqs", "4"])
    assert argv[argv.index("--chat-template") + 1] == template and argv[-2:] == ["--max-num-seqs", "4"]
    own = server_command(str(folder), 0, vllm_options=["--", "--chat-template=mine.jinja"])
    assert own.count("--chat-template") == 0 and own[-1] == "--chat-template=mine.jinja"


def test_a_family_the_plugin_does_not_serve_is_refused_by_name(tmp_path):
    """InternVL3 has a VISOR model, but no vLLM port: `visor serve` says so before starting anything."""
    folder, _ = write_open_visor_checkpoint("internvl3", tmp_path)
    with pytest.raises(ValueError, match="vLLM serves VISOR checkpoints .*; this checkpoint is 'visor_internvl'"):
        server_command(str(folder), 0)


def test_a_video_server_takes_one_video_per_prompt(tmp_path):
    """`--modality video` on LLaVA-OV: vLLM's limits allow one video and no image; a Qwen-VL folder is refused."""
    folder, _ = write_open_visor_checkpoint("llava-onevision", tmp_path / "ov")
    argv = server_command(str(folder), 0, modality="video")
    assert json.loads(argv[argv.index("--limit-mm-per-prompt") + 1]) == {"image": 0, "video": 1}
    argv = server_command(str(folder), 0)
    assert json.loads(argv[argv.index("--limit-mm-per-prompt") + 1]) == {"image": 1, "video": 0}
    qwen, _ = write_open_visor_checkpoint("qwen2.5-vl", tmp_path / "qwen")
    with pytest.raises(ValueError, match="video on LLaVA-OneVision checkpoints"):
        server_command(str(qwen), 0, modality="video")
