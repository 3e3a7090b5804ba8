"""Every family's released checkpoint layout through every command, as a user runs them (`visor convert`,
`visor generate`, `visor train`, `visor evaluate`), on the tiny folders of `released_checkpoints.py`.

The reference is the stock pipeline: the stock model with the stock processor (built from the folder's own pieces,
see tests/data/test_released_processors.py) and `generate`. The dense conversion must answer exactly as it does,
token for token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from visor import cli
from visor.backbones import backbone_for, checkpoint_config
from visor.evaluation.scoring import greedy, new_tokens
from visor.integrations.runner import CheckpointRunner
from visor.modeling.visor import load_stock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "data"))
sys.path.insert(0, str(HERE / "training"))
from conversation_fixture import fixture_records, write_llava_fixture  # noqa: E402
from released_checkpoints import FAMILIES, write_released_checkpoint  # noqa: E402
from test_released_processors import stock_processor  # noqa: E402
from training_helpers import set_flags  # noqa: E402

QUESTION = "what shape is in the image ?"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """LLaVA-format records whose every conversation shows two images, so any training batch holds some."""
    single = [record for record in fixture_records(images=12, turns=1) if isinstance(record["image"], str)]
    records = []
    for index, record in enumerate(single):
        other = single[(index + 1) % len(single)]["image"]
        question, answer = record["conversations"]
        records.append({**record, "image": [record["image"], other], "conversations": [
            {"from": "human", "value": "<image>\n<image>\n" + question["value"].removeprefix("<image>\n")}, answer]})
    return write_llava_fixture(tmp_path_factory.mktemp("two-images"), records)


def _image(data: Path) -> Path:
    return data.parent / fixture_records(images=12)[0]["image"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    stock = write_released_checkpoint(request.param, root / "stock")
    return request.param, stock, root


def test_dense_conversion_answers_as_the_stock_pipeline_token_for_token(family, data, capsys):
    from PIL import Image

    name, stock_folder, root = family
    config = checkpoint_config(stock_folder)
    stock_model = load_stock(backbone_for(config).stock_model_class, stock_folder).eval()
    processor = stock_processor(name, stock_folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=[[Image.open(_image(data))]], text=[processor.apply_chat_template(
        messages, add_generation_prompt=True)], return_tensors="pt")
    with torch.no_grad():
        expected = new_tokens(greedy(stock_model, inputs, max_new_tokens=8), inputs)

    dense = root / "dense"
    assert cli.main(["convert", "--model", str(stock_folder), "--output", str(dense), "--dense"]) == 0
    runner = CheckpointRunner(dense, configuration=0)
    ours = runner.processor([_image(data)], [QUESTION])
    assert torch.equal(ours["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        answered = new_tokens(greedy(runner.model, dict(ours), max_new_tokens=8, configuration=0), ours)
    assert answered.tolist() == expected.tolist()

    capsys.readouterr()
    assert cli.main(["generate", "--model", str(dense), "--image", str(_image(data)), "--question", QUESTION,
                     "--configuration", "0", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.splitlines()[0].removeprefix("answer: ")
    assert printed == (runner.processor.decode(expected[0]) or
                       "(empty: the model ended the answer at once)")


def test_sparse_conversion_trains_answers_and_evaluates(family, data, tmp_path, capsys):
    name, stock_folder, root = family
    visor = tmp_path / "visor"
    assert cli.main(["convert", "--model", str(stock_folder), "--output", str(visor)]) == 0
    for file in ("chat_template.json", "preprocessor_config.json", "tokenizer.json"):  # the processor travels
        assert (visor / file).read_bytes() == (stock_folder / file).read_bytes()
    configurations = json.loads((visor / "config.json").read_text())["configurations"]
    assert len(configurations) > 1

    flags = ["--max-steps", "2", "--no-progress", *set_flags(samples_per_task=2, batch_size=2)]
    for recipe, init, output in (("visor-stage1", visor, tmp_path / "stage1"),
                                 ("visor-universal", tmp_path / "stage1" / "model", tmp_path / "universal")):
        assert cli.main(["train", "--recipe", recipe, "--data", f"llava:{data}", "--init", str(init),
                         "--output", str(output), *flags]) == 0
    trained = tmp_path / "universal" / "model"
    # The trained folder reads its inputs as the stock one did (its own processor settings, saved with it).
    assert json.loads((trained / "preprocessor_config.json").read_text())["image_mean"] == json.loads(
        (stock_folder / "preprocessor_config.json").read_text())["image_mean"]

    capsys.readouterr()
    for index in range(len(configurations)):
        assert cli.main(["generate", "--model", str(trained), "--image", str(_image(data)), "--question", QUESTION,
                         "--configuration", str(index), "--max-new-tokens", "4"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("answer: ") and f"configuration: {index} " in out
    assert cli.main(["evaluate", "--model", str(trained), "--data", f"llava:{data}", "--split", "test",
                     "--configurations", "0"]) == 0
    assert "conversation" in capsys.readouterr().out
