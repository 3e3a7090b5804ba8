"""Conversation data: both formats read the same records, splits, broken records, and the processor's
multi-turn labels (every assistant turn, nothing else)."""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from visor.data.conversations import read_conversations
from visor.data.processor import VisorProcessor
from visor.data.render import IGNORE_INDEX
from visor.training.conversations import ConversationSource

from conversation_fixture import fixture_records, write_hf_fixture, write_llava_fixture


@pytest.fixture(scope="module")
def llava_file(tmp_path_factory):
    return write_llava_fixture(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, llava_file):
    return write_hf_fixture(tmp_path_factory.mktemp("hf") / "data", fixture_records(), llava_file.parent)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, stock_models, tokenizer):
    folder = tmp_path_factory.mktemp("model")
    stock_models["tiny"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_both_formats_read_the_same_records_and_hold_out_the_same_ones(llava_file, hf_folder):
    llava = read_conversations("llava", llava_file)
    hf = read_conversations("hf", hf_folder)
    assert {split: len(records) for split, records in llava.splits.items()} == {"train": 23, "validation": 1, "test": 1}
    for split in llava.splits:
        assert [r.messages for r in llava.splits[split]] == [r.messages for r in hf.splits[split]]
        assert [len(r.images) for r in llava.splits[split]] == [len(r.images) for r in hf.splits[split]]
    assert [r.where for r in read_conversations("llava", llava_file).splits["test"]] == \
        [r.where for r in llava.splits["test"]]
    roles = [m["role"] for m in llava.splits["train"][0].messages]
    assert roles == ["user", "assistant", "user", "assistant"]


def _image_file(name: str, write):
    """A mend that gives the record the image `name` (under the image root), written by `write(path)`."""
    def mend(record, root):
        write(root / name)
        record.update(image=name)
    return mend


def _truncated(path):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize("mend, message", [
    (lambda r, root: r.update(image="nowhere.png"), "nowhere.png does not exist"),
    (lambda r, root: r["conversations"][0].update(value="no placeholder"), "0 <image> placeholders but 1 images"),
    (lambda r, root: r.update(conversations=r["conversations"][:1]), "no assistant turn"),
    (lambda r, root: r["conversations"][0].update({"from": "robot"}), "turn 0 must have 'from'"),
    (lambda r, root: r["conversations"][3].update(value=""), "assistant turn 3 is empty"),  # the first one answers
    (lambda r, root: r.update(image="images/../../elsewhere.png"), "lies outside the image root"),
    (_image_file("images/corrupt.png", lambda path: path.write_bytes(b"GIF89a, then nothing")),
     "corrupt.png is not an image file Pillow can read"),
    (_image_file("images/empty.png", lambda path: path.write_bytes(b"")), "empty.png is not an image file"),
    (_image_file("images/cut.png", _truncated), "cut.png is truncated or corrupt"),
    (_image_file("images/dot.png", lambda path: Image.new("RGB", (1, 1)).save(path)),
     "dot.png is 1x1 px, smaller than one 8x8 vision patch"),
])
def test_a_broken_record_is_named_or_skipped_and_counted(tmp_path, mend, message):
    records = fixture_records(images=6)
    (tmp_path / "images").mkdir()
    mend(records[3], tmp_path)
    path = write_llava_fixture(tmp_path, records)
    with pytest.raises(ValueError, match=rf"data.json record 3 \(id easy-3\): .*{message}"):
        read_conversations("llava", path, min_image_side=8)
    data = read_conversations("llava", path, skip_broken=True, min_image_side=8)
    assert len(data.skipped) == 1 and message in data.skipped[0]
    assert sum(len(records) for records in data.splits.values()) == len(records) - 1


def test_images_outside_the_root_are_read_only_when_asked(tmp_path):
    records = fixture_records(images=6)
    path = write_llava_fixture(tmp_path / "data", records)
    outside = tmp_path / "outside.png"
    (path.parent / records[3]["image"]).rename(outside)
    (path.parent / records[3]["image"]).symlink_to(outside)  # inside the root by name, outside by its target
    with pytest.raises(ValueError, match="record 3 .* lies outside the image root"):
        read_conversations("llava", path)
    data = read_conversations("llava", path, images_outside_root=True)
    assert sum(len(records) for records in data.splits.values()) == len(records)


def test_a_stored_image_pillow_cannot_read_is_a_broken_record(tmp_path, hf_folder):
    import datasets

    stored = datasets.Sequence(datasets.Image(decode=False))
    dataset = datasets.load_from_disk(str(hf_folder)).cast_column("images", stored)
    rows = dataset.to_list()
    rows[2]["images"] = [{"bytes": b"not an image", "path": None}]
    datasets.Dataset.from_list(rows, features=dataset.features).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"row 2: image 0: its stored bytes are not an image Pillow can read"):
        read_conversations("hf", tmp_path / "hf")
    assert len(read_conversations("hf", tmp_path / "hf", skip_broken=True).skipped) == 1


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_conversations("llava", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_conversations("llava", tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot be split"):
        read_conversations("llava", write_llava_fixture(tmp_path, fixture_records(images=2)[:2]))
    with pytest.raises(ValueError, match="neither a datasets folder"):
        read_conversations("hf", tmp_path)


def _labelled_text(batch, row):
    labels = batch["labels"][row]
    pieces, current = [], []
    for token, label in zip(batch["input_ids"][row].tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            pieces.append(current)
            current = []
    return pieces + ([current] if current else [])


def test_every_assistant_turn_is_labelled_and_nothing_else(stock_models, tokenizer, llava_file):
    processor = VisorProcessor(stock_models["tiny"].config, tokenizer)
    record = read_conversations("llava", llava_file).splits["train"][0]
    batch = processor.conversations([list(record.images)], [record.messages])
    answers = [m["content"] for m in record.messages if m["role"] == "assistant"]
    pieces = _labelled_text(batch, 0)
    assert [tokenizer.decode(piece[:-1]) for piece in pieces] == answers
    assert all(piece[-1] == tokenizer.eos_token_id for piece in pieces)
    # The prompt for the last answer is the training row up to that answer.
    prompt = processor.conversations([list(record.images)], [record.messages], prompt_only=True)
    length = prompt["input_ids"].shape[1]
    assert torch.equal(prompt["input_ids"][0], batch["input_ids"][0, :length])
    assert (batch["labels"][0, :length] != IGNORE_INDEX).sum() == len(pieces[0])


def test_a_single_turn_conversation_is_the_question_answer_batch(stock_models, tokenizer, llava_file):
    processor = VisorProcessor(stock_models["tiny"].config, tokenizer)
    image = llava_file.parent / fixture_records()[0]["image"]
    messages = [{"role": "user", "content": "<image>\nwhat shape is in the image ?"},
                {"role": "assistant", "content": "circle"}]
    for prompt_only in (False, True):
        pair = processor(image, "what shape is in the image ?", None if prompt_only else "circle")
        conversation = processor.conversations([[image]], [messages], prompt_only=prompt_only)
        assert pair.keys() == conversation.keys()
        assert all(torch.equal(pair[key], conversation[key]) for key in pair)


def test_max_length_cuts_text_but_never_an_image(stock_models, tokenizer, llava_file):
    processor = VisorProcessor(stock_models["tiny"].config, tokenizer)
    record = read_conversations("llava", llava_file).splits["train"][0]
    full = processor.conversations([list(record.images)], [record.messages])
    length = full["input_ids"].shape[1]
    cut = processor.conversations([list(record.images)], [record.messages], max_length=length - 3)
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :length - 3])
    with pytest.raises(ValueError, match="its images end at token"):
        processor.conversations([list(record.images)], [record.messages], max_length=10)


def test_training_batches_are_deterministic_and_the_stock_model_takes_them(stock_models, model_dir, llava_file):
    model = stock_models["tiny"]
    source = ConversationSource(model.config, "llava", llava_file, model_dir, seed=3)
    again = ConversationSource(model.config, "llava", llava_file, model_dir, seed=3)
    indices = list(range(20, 26))  # across the first epoch's end (23 training records)
    batch = source.train_batch(indices)
    assert all(torch.equal(batch[key], again.train_batch(indices)[key]) for key in batch)
    epoch = [source._order(0)[i] for i in range(23)]
    assert sorted(epoch) == list(range(23))
    two_images = next(i for i, r in enumerate(source.data.splits["train"]) if len(r.images) == 2)
    position = source._order(0).index(two_images)
    mixed = source.train_batch([position, (position + 1) % 23])
    assert mixed["pixel_values"].shape[0] == 3  # two images in the first row, one in the second
    with torch.no_grad():
        assert torch.isfinite(model(**mixed).loss)
    (evaluation,) = source.eval_batches("validation", per_task=5, batch_size=4)
    assert evaluation.tasks == ["conversation"] and "labels" not in evaluation.inputs
    assert evaluation.answers == [source.data.splits["validation"][0].messages[-1]["content"]]


def test_conversation_data_needs_the_models_tokenizer(stock_models, tmp_path, llava_file):
    with pytest.raises(ValueError, match="model's own tokenizer"):
        ConversationSource(stock_models["tiny"].config, "llava", llava_file, tmp_path)
