"""Conversation data end to end, as a user runs it: a stock checkpoint with its tokenizer, `visor convert`, stage 1
and universal training on a LLaVA-format file (the loss falls), `visor generate`, and evaluation on the held-out
records; the same through a `datasets` folder; and SmolLM2's real tokenizer and chat template labelling turns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import set_flags

from visor import cli, presets
from visor.data.render import IGNORE_INDEX
from visor.evaluation.scoring import evaluate
from visor.training.recipes import load_checkpoint
from visor.training.conversations import ConversationSource

sys.path.insert(0, str(Path(__file__).parent.parent / "data"))
from conversation_fixture import fixture_records, write_hf_fixture, write_llava_fixture  # noqa: E402


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor.data.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("stock")
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(presets.tiny(2)).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smollm2_stock_folder(tmp_path_factory, smollm2, smollm2_llava_factory):
    """A stock LLaVA-OV whose text model is the real SmolLM2-135M, saved with SmolLM2's own tokenizer and chat
    template (plus its `<image>` token)."""
    from visor.data.tokenizer import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    model = smollm2_llava_factory(smollm2, tokenizer.convert_tokens_to_ids("<image>"), vocab_size=len(tokenizer))
    folder = tmp_path_factory.mktemp("smollm2-stock")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_file(tmp_path_factory):
    return write_llava_fixture(tmp_path_factory.mktemp("llava"))


def _loss(model, source, indices=range(8)) -> float:
    with torch.no_grad():
        return float(model(**source.train_batch(list(indices))).loss)


@pytest.mark.parametrize("stock", ["stock_folder", "smollm2_stock_folder"])
def test_convert_train_generate_and_evaluate_on_llava_data(stock, llava_file, tmp_path, capsys, request):
    stock_folder = request.getfixturevalue(stock)
    data = f"llava:{llava_file}"
    assert cli.main(["convert", "--model", str(stock_folder), "--output", str(tmp_path / "visor")]) == 0
    flags = set_flags(samples_per_task=4)
    for recipe, init, output in (("visor-stage1", tmp_path / "visor", tmp_path / "stage1"),
                                 ("visor-universal", tmp_path / "stage1" / "model", tmp_path / "universal")):
        assert cli.main(["train", "--recipe", recipe, "--data", data, "--init", str(init), "--output", str(output),
                         "--max-steps", "12", "--no-progress", *flags]) == 0
    summary = json.loads((tmp_path / "universal" / "training_summary.json").read_text())
    assert summary["skipped_records"] == 0 and summary["validation"]["final"]

    converted = load_checkpoint(tmp_path / "visor")
    trained = load_checkpoint(tmp_path / "universal" / "model")
    source = ConversationSource(trained.config, "llava", llava_file, tmp_path / "universal" / "model")
    assert _loss(trained.eval(), source) < 0.85 * _loss(converted.eval(), source)  # 6.27 -> 4.88 when written

    image = llava_file.parent / fixture_records()[0]["image"]
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tmp_path / "universal" / "model"), "--image", str(image),
                     "--question", "what shape is in the image ?", "--configuration", "0"]) == 0
    assert capsys.readouterr().out.strip()
    accuracy = evaluate(trained, source, split="test", per_task=10, batch_size=4, configuration=0)
    assert set(accuracy) == {"conversation", "mean"} and 0 <= accuracy["mean"] <= 100


def test_a_datasets_folder_trains_the_same_samples(stock_folder, llava_file, tmp_path):
    folder = write_hf_fixture(tmp_path / "hf", fixture_records(), llava_file.parent)
    model = load_checkpoint(stock_folder)
    llava = ConversationSource(model.config, "llava", llava_file, stock_folder, seed=1)
    hf = ConversationSource(model.config, "hf", folder, stock_folder, seed=1)
    a, b = llava.train_batch(range(10, 16)), hf.train_batch(range(10, 16))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_bad_conversation_input_stops_before_training(stock_folder, llava_file, tmp_path):
    base = ["train", "--recipe", "visor-stage1", "--output", str(tmp_path / "run"), "--max-steps", "1"]
    assert cli.main([*base, "--data", "llava:", "--init", str(stock_folder)]) == 2
    assert cli.main([*base, "--data", f"llava:{tmp_path}/none.json", "--init", str(stock_folder)]) == 2
    assert cli.main([*base, "--data", f"llava:{llava_file}", "--model", "tiny"]) == 2
    assert cli.main([*base, "--data", f"llava:{llava_file}", "--init", str(stock_folder),
                     "--image-root", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "run" / "model").exists()


def test_smollm2s_chat_template_labels_every_assistant_turn(llava_file):
    pytest.importorskip("gguf")
    from visor.data.processor import VisorProcessor
    from visor.data.tokenizer import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    config = presets.tiny_llama(2)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.text_config.vocab_size = len(tokenizer)
    processor = VisorProcessor(config, tokenizer)
    record = fixture_records()[0]
    messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                for t in record["conversations"]]
    batch = processor.conversations([[llava_file.parent / record["image"]]], [messages])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    labelled = tokenizer.decode(ids[labels != IGNORE_INDEX])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert labelled == "<|im_end|>".join(answers) + "<|im_end|>"
    # The turns around the answers (system prompt, user turns, "\n" after each <|im_end|>) are context only.
    text = tokenizer.decode(ids)
    assert text.count("<|im_start|>assistant\n") == 2 and "<|im_start|>system" in text
