"""Bad input, table-driven: every case is refused with a message naming the problem, no traceback, and nothing
written anywhere (the whole fixture folder, outputs included, is compared before and after).

A command-line case runs `visor ...` in-process and must exit with status 2 (argparse's and `run_command`'s
code for bad input); a Python case must raise a ValueError. Each case carries its class (the kinds of bad input
issue-style reports group them in): weights, router, run folder, policy, API options, output paths, malformed
input.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

from visor import VisorConfig, VisorForConditionalGeneration, cli
from visor.data.conversations import hold_out
from visor.data.processor import load_image
from visor.integrations.lmms_tasks import write_task
from visor.integrations.runner import CheckpointRunner
from visor.modeling import load_stock
from visor.policy.api import label_synthetic
from visor.policy.labels import LabelTable
from visor.policy.training import train_router
from visor.training.recipes import load_checkpoint

SHIPPED = Path(__file__).parents[1] / "src" / "visor" / "demo" / "checkpoint"


@dataclass(frozen=True)
class Case:
    kind: str  # the class of bad input
    name: str
    match: str  # what the message must say
    argv: Callable | None = None  # World -> the `visor` command line
    call: Callable | None = None  # World -> None, expected to raise ValueError


class World:
    """The folders and models every case reads: made once, never changed by a case."""

    def __init__(self, root: Path, hold_lock):
        self.root = root
        self.stock = root / "stock"
        shutil.copytree(SHIPPED, self.stock)
        self.tokenizer = AutoTokenizer.from_pretrained(self.stock)
        self.stock_model = LlavaOnevisionForConditionalGeneration.from_pretrained(self.stock).eval()
        self.visor_model = VisorForConditionalGeneration.from_stock(self.stock_model).eval()
        self.visor = self._save("visor", self.visor_model)
        self.dense = self._save("dense", VisorForConditionalGeneration.from_stock(
            self.stock_model, VisorConfig.dense(self.stock_model.config)))
        table = label_synthetic(self.visor_model, "train", per_task=1, batch_size=8, show_progress=False, suite="demo")
        self.labels = root / "labels.safetensors"
        table.save(self.labels)
        LabelTable(table.features, table.probability, table.correct, table.flops, table.tokens, table.tasks,
                   table.groups, {**table.fingerprint, "hidden_size": 1}).save(root / "labels-other.safetensors")
        self.labels_other = root / "labels-other.safetensors"
        policy_model = VisorForConditionalGeneration.from_stock(self.stock_model).eval()
        policy_model.load_state_dict(self.visor_model.state_dict())
        train_router(policy_model.router, table, steps=5)
        self.policy = self._save("policy", policy_model)
        self.run = root / "run"  # a finished 1-step training run
        assert cli.main(["train", "--recipe", "full", "--data", "synthetic@demo", "--model", "tiny", "--output",
                         str(self.run), "--max-steps", "1", "--set", "batch_size=2", "--set", "samples_per_task=1",
                         "--set", "mixed_precision=no", "--no-progress"]) == 0
        self.out = root / "out"  # an output nobody may create
        self.file = root / "notes.txt"
        self.file.write_text("not a folder\n")
        self.misc = root / "misc"  # a folder of someone's files, not a checkpoint
        self.misc.mkdir()
        (self.misc / "keep.txt").write_text("mine\n")
        self.image = root / "red.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(self.image)
        self.bomb = root / "bomb.png"
        self.bomb.write_bytes(_png_header(30000, 30000))
        self.truncated_image = root / "truncated.png"
        self.truncated_image.write_bytes(self.image.read_bytes()[:60])
        self.broken = {name: self._broken(name, edit) for name, edit in BROKEN.items()}
        self.stock_link = root / "stock-link"  # the stock folder by another name
        self.stock_link.symlink_to(self.stock)
        self.readme_model = root / "readme-model"  # another model's folder: a checkpoint and its README
        shutil.copytree(self.visor, self.readme_model)
        (self.readme_model / "README.md").write_text("# someone's model\n")
        self.labelled = root / "labelled"  # a checkpoint with its label table inside
        shutil.copytree(self.visor, self.labelled)
        shutil.copyfile(self.labels, self.labelled / "labels.safetensors")
        self.nan_config = root / "nan.yaml"
        self.nan_config.write_text("adam_epsilon: .nan\n")
        self.conversations = self._conversations()
        self.locked = root / "locked"  # a run folder another process is training into
        hold_lock(self.locked)

    def _save(self, name: str, model) -> Path:
        model.save_pretrained(self.root / name)
        self.tokenizer.save_pretrained(self.root / name)
        return self.root / name

    def _broken(self, name: str, edit) -> Path:
        folder = self.root / f"broken-{name}"
        shutil.copytree(self.visor, folder)
        edit(folder)
        return folder

    def _conversations(self) -> dict[str, Path]:
        """A LLaVA-format data file per entry of `CONVERSATIONS` (four one-image records, one of them broken that
        way), with their images under conversations/images; the image root is the files' folder."""
        folder = self.root / "conversations"
        images = folder / "images"
        images.mkdir(parents=True)
        for index in range(4):
            Image.new("RGB", (64, 64), (60 * index, 30, 30)).save(images / f"{index}.png")
        (images / "corrupt.png").write_bytes(b"\x89PNG but nothing an image holds")
        (images / "empty.png").write_bytes(b"")
        (images / "truncated.png").write_bytes(self.truncated_image.read_bytes())
        (images / "bomb.png").write_bytes(self.bomb.read_bytes())
        Image.new("RGB", (1, 1)).save(images / "dot.png")
        (images / "link.png").symlink_to(self.image)  # a link out of the image root
        files = {}
        for name, edit in CONVERSATIONS.items():
            records = [_conversation(index) for index in range(4)]
            edit(self, records)
            files[name] = folder / f"{name}.json"
            files[name].write_text(json.dumps(records))
        return files

    def snapshot(self) -> list:
        return sorted((str(path.relative_to(self.root)), path.stat().st_size, path.stat().st_mtime_ns)
                      for path in self.root.rglob("*"))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb: the pixels are not there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _edit_tensors(change):
    def edit(folder):
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


def _drop(part):
    """Drop every tensor whose name contains `part` (saved names may carry the checkpoint format's prefixes)."""
    def change(tensors):
        for key in [key for key in tensors if part in key]:
            del tensors[key]
    return change


def _write(name, content):
    return lambda folder: (folder / name).write_text(content)


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _only_pickle(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


BROKEN = {
    "moved-ca": _edit_config(cross_attention_layers=[1, 3], self_attention_layers=[2, 4], configurations=[[], [2], [2, 4]]),
    "dropped": _edit_tensors(_drop("layers.2.mlp.up_proj")),
    "extra": _edit_tensors(lambda tensors: tensors.update({"extra.weight": torch.zeros(3)})),
    "no-router": _edit_tensors(_drop("router.")),
    "reshaped": _edit_tensors(lambda tensors: tensors.update(
        {"router.norm.weight": torch.ones(tensors["router.norm.weight"].shape[0] + 1)})),
    "truncated": _truncate,
    "config-list": _write("config.json", "[1, 2]"),
    "config-corrupt": _write("config.json", "{not json"),
    "unknown-type": _edit_config(model_type="mystery"),
    "pickle-only": _only_pickle,
    "no-config": lambda folder: (folder / "config.json").unlink(),
}


def _conversation(index: int) -> dict:
    return {"id": f"r{index}", "image": f"images/{index}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red"}]}


HELD_OUT = hold_out(list(range(4)))["validation"][0]  # the validation record of a four-record file


def _image(name, record=1):
    """An edit that gives record `record` the image `name` (relative to the image root, or a World -> path)."""
    return lambda w, records: records[record].update(image=name if isinstance(name, str) else str(name(w)))


CONVERSATIONS = {
    "good": lambda w, records: None,
    "parent": _image("images/../../red.png"),
    "absolute": _image(lambda w: w.image),
    "symlink": _image("images/link.png"),
    "empty-answer": lambda w, records: records[1]["conversations"][1].update(value=" "),
    "corrupt": _image("images/corrupt.png"),
    "empty-file": _image("images/empty.png"),
    "truncated": _image("images/truncated.png"),
    "bomb": _image("images/bomb.png"),
    "dot": _image("images/dot.png"),
    "corrupt-held-out": _image("images/corrupt.png", record=HELD_OUT),
}


# ---- the table ------------------------------------------------------------------------------------------------------
def _generate(w, model, *extra, image=None):
    return ["generate", "--model", str(model), "--image", str(image or w.image), "--question", "what color ?", *extra]


def _train(w, *extra, output=None, recipe="full", source=("--model", "tiny")):
    return ["train", "--recipe", recipe, "--data", "synthetic@demo", *source, "--output", str(output or w.out),
            "--max-steps", "1", *extra]


def _train_on(w, data, *extra, output=None):
    """Stage 1 from the stock checkpoint on the conversation file `data` (a name in `CONVERSATIONS`)."""
    return ["train", "--recipe", "visor-stage1", "--data", f"llava:{w.conversations[data]}", "--init", str(w.stock),
            "--output", str(output or w.out), "--max-steps", "1", *extra]


def _convert(w, output):
    return ["convert", "--model", str(w.stock), "--output", str(output)]


def _resume(*changes, output=None):
    """The fixture's run (or a copy at `output`) resumed with its own settings but `changes` (more options)."""
    def argv(w):
        settings = ["--set", "batch_size=2", "--set", "samples_per_task=1", "--set", "mixed_precision=no"]
        return _train(w, *settings, *changes, "--resume", "--no-progress", output=output or w.run)
    return argv


def _forward(w, model=None, **inputs):
    model = model or w.visor_model
    return model(**{"input_ids": torch.tensor([[1, 5, 6, 7]]), **inputs})


def _with_image(w, **inputs):
    """A prompt with one image of the shipped model's size (its <image> count from the stock vision path)."""
    from visor.data import VisorProcessor

    processor = VisorProcessor(w.visor_model.config, w.tokenizer)
    batch = dict(processor([Image.new("RGB", (64, 64))], ["what color ?"]))
    return _forward(w, **{**batch, **inputs})


def _from_stock(w, **options):
    return VisorForConditionalGeneration.from_stock(w.stock_model, **options)


def _policy_label(w, *extra, model=None, output=None):
    return ["policy", "label", "--model", str(model or w.visor), "--suite", "demo", "--per-task", "1",
            "--output", str(output or w.out / "labels.safetensors"), *extra]


def _policy_train(w, *extra, model=None, labels=None, output=None):
    return ["policy", "train", "--model", str(model or w.visor), "--labels", str(labels or w.labels),
            "--output", str(output or w.out), "--steps", "2", *extra]


def _calibrate(w, *target, model=None):
    return ["policy", "calibrate", "--model", str(model or w.policy), "--labels", str(w.labels), *target]


def _report(w, *extra, model=None, output=None):
    return ["policy", "report", "--model", str(model or w.policy), "--labels", str(w.labels),
            "--output", str(output or w.out), *extra]


def _demo(w, *extra, output=None):
    return ["demo", "--quick", "--no-progress", "--output", str(output or w.out), *extra]


def _bench(w, *extra, output=None):
    return ["bench", "--preset", "tiny", "--repeats", "1", "--output", str(output or w.out), *extra]


def _train_bench(w, *extra):
    return ["bench", "--train", "--preset", "tiny", "--visual-tokens", "128", "--output", str(w.out), *extra]


def _preview(w, *extra, output=None):
    return ["data", "preview", "--task", "bar_value", "--output", str(output or w.out / "sheet.png"), *extra]


def _analyze(w, *extra, model=None, output=None):
    return ["analyze", "--model", str(model or w.stock), "--data", "synthetic@demo", "--output", str(output or w.out),
            *extra]


WEIGHTS, ROUTER, RUNS, POLICY, OPTIONS, OUTPUTS, MALFORMED = (
    "weights", "router", "run folder", "policy", "API options", "output paths", "malformed input")

CASES = [
    # 1. weights that do not fit: never random-initialised
    Case(WEIGHTS, "moved CA layers", "missing from the folder: cross_attention.1",
         call=lambda w: VisorForConditionalGeneration.from_pretrained(w.broken["moved-ca"])),
    Case(WEIGHTS, "dropped tensor", "missing from the folder: model.language_model.layers.2.mlp.up_proj.weight",
         call=lambda w: VisorForConditionalGeneration.from_pretrained(w.broken["dropped"])),
    Case(WEIGHTS, "extra tensor", "not in the model: extra.weight",
         call=lambda w: VisorForConditionalGeneration.from_pretrained(w.broken["extra"])),
    Case(WEIGHTS, "router dropped", "missing from the folder: router.",
         call=lambda w: VisorForConditionalGeneration.from_pretrained(w.broken["no-router"])),
    Case(WEIGHTS, "tensor of another shape", "of another shape: router.norm.weight",
         call=lambda w: VisorForConditionalGeneration.from_pretrained(w.broken["reshaped"])),
    Case(WEIGHTS, "VISOR class on a stock folder", "holds a 'llava_onevision' model, not 'visor'",
         call=lambda w: VisorForConditionalGeneration.from_pretrained(w.stock)),
    Case(WEIGHTS, "stock class on a VISOR folder", "holds a 'visor' model, not 'llava_onevision'",
         call=lambda w: load_stock(LlavaOnevisionForConditionalGeneration, w.visor)),
    Case(WEIGHTS, "loading info asked for", "loading is strict",
         call=lambda w: VisorForConditionalGeneration.from_pretrained(w.visor, output_loading_info=True)),
    Case(WEIGHTS, "truncated weights", "cannot load a VISOR checkpoint",
         call=lambda w: load_checkpoint(w.broken["truncated"])),
    Case(WEIGHTS, "config.json a JSON list", "not a JSON object", call=lambda w: load_checkpoint(w.broken["config-list"])),
    Case(WEIGHTS, "config.json corrupt", "corrupt config.json", call=lambda w: load_checkpoint(w.broken["config-corrupt"])),
    Case(WEIGHTS, "unknown model type", "no VISOR backbone for model type 'mystery'",
         call=lambda w: load_checkpoint(w.broken["unknown-type"])),
    Case(WEIGHTS, "pickle weights only", "no safetensors weights", call=lambda w: load_checkpoint(w.broken["pickle-only"])),
    Case(WEIGHTS, "no config.json", "no config.json", call=lambda w: load_checkpoint(w.broken["no-config"])),
    Case(WEIGHTS, "a file as checkpoint", "not a local checkpoint folder", call=lambda w: load_checkpoint(w.file)),
    Case(WEIGHTS, "a hub name", "does not exist", call=lambda w: load_checkpoint("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")),
    Case(WEIGHTS, "generate on dropped tensor", "missing from the folder",
         argv=lambda w: _generate(w, w.broken["dropped"], "--configuration", "0")),
    Case(WEIGHTS, "train --init with an extra tensor", "not in the model: extra.weight",
         argv=lambda w: _train(w, recipe="visor-universal", source=("--init", str(w.broken["extra"])))),
    Case(WEIGHTS, "policy label on moved CA layers", "do not fit its config.json",
         argv=lambda w: _policy_label(w, model=w.broken["moved-ca"])),
    Case(WEIGHTS, "generate --model a hub name", "does not exist",
         argv=lambda w: _generate(w, "llava-hf/llava-onevision-qwen2-0.5b-ov-hf")),
    # 2. an untrained router never chooses
    Case(ROUTER, "forward auto", "never trained", call=lambda w: _forward(w, configuration="auto")),
    Case(ROUTER, "generate() auto", "never trained",
         call=lambda w: w.visor_model.generate(input_ids=torch.tensor([[1, 5]]), configuration="auto", max_new_tokens=2)),
    Case(ROUTER, "visor generate default", "never trained", argv=lambda w: _generate(w, w.visor)),
    Case(ROUTER, "visor generate --tau", "never trained", argv=lambda w: _generate(w, w.visor, "--tau", "0.5")),
    Case(ROUTER, "policy calibrate", "never trained", argv=lambda w: _calibrate(w, "--target-accuracy", "10",
                                                                                 model=w.visor)),
    Case(ROUTER, "policy report", "never trained", argv=lambda w: _report(w, model=w.visor)),
    Case(ROUTER, "runner auto (lmms-eval's path)", "never trained", call=lambda w: CheckpointRunner(w.visor, "auto")),
    Case(ROUTER, "auto with one configuration", "single configuration",
         call=lambda w: _forward(w, VisorForConditionalGeneration.from_pretrained(w.dense), configuration="auto")),
    Case(ROUTER, "τ with a fixed configuration", 'applies to configuration="auto" only',
         call=lambda w: _forward(w, configuration=0, router_threshold=0.5)),
    Case(ROUTER, "generate --tau with an index", "applies to configuration 'auto' only",
         argv=lambda w: _generate(w, w.policy, "--configuration", "0", "--tau", "0.5")),
    Case(ROUTER, "generate --tau 1.5", "must lie in [0, 1]", argv=lambda w: _generate(w, w.policy, "--tau", "1.5")),
    Case(ROUTER, "generate --tau nan", "must lie in [0, 1]", argv=lambda w: _generate(w, w.policy, "--tau", "nan")),
    # 3. a run folder holds one run
    Case(RUNS, "fresh train into a finished run", "already holds a training run", argv=lambda w: _train(w, output=w.run)),
    Case(RUNS, "resume with another batch size", "batch_size: 2 -> 4", argv=_resume("--set", "batch_size=4")),
    Case(RUNS, "resume with another learning rate", "learning_rate: 0.001 -> 0.01",
         argv=_resume("--set", "learning_rate=0.01")),
    Case(RUNS, "resume with another seed", "seed: 0 -> 3", argv=_resume("--seed", "3")),
    Case(RUNS, "resume with more steps", "max_steps: 1 -> 5", argv=_resume("--max-steps", "5")),
    Case(RUNS, "resume with other data", "data: 'synthetic@demo' -> 'synthetic'",
         argv=lambda w: [arg if arg != "synthetic@demo" else "synthetic" for arg in _resume()(w)]),
    Case(RUNS, "resume from another starting point", "model_preset: 'tiny' -> None",
         argv=lambda w: [*_resume()(w)[:5], "--init", str(w.stock), *_resume()(w)[7:]]),
    Case(RUNS, "resume with another recipe", "recipe: 'full' -> 'visor-stage1'",
         argv=lambda w: [*_resume()(w)[:2], "visor-stage1", *_resume()(w)[3:5], "--init", str(w.stock),
                         *_resume()(w)[7:]]),
    Case(RUNS, "train --output a file", "is a file, not a folder", argv=lambda w: _train(w, output=w.file)),
    Case(RUNS, "train --output under a file", "cannot be created", argv=lambda w: _train(w, output=w.file / "run")),
    Case(RUNS, "configurations search --output a file", "is a file, not a folder",
         argv=lambda w: ["configurations", "search", "--model", str(w.visor), "--data", "synthetic@demo", "--output",
                         str(w.file)]),
    Case(RUNS, "configurations search --output a folder of other files", "holds files but no checkpoint",
         argv=lambda w: ["configurations", "search", "--model", str(w.visor), "--data", "synthetic@demo", "--output",
                         str(w.misc)]),
    Case(RUNS, "configurations search --output its model", "is the input",
         argv=lambda w: ["configurations", "search", "--model", str(w.visor), "--data", "synthetic@demo", "--output",
                         str(w.visor)]),
    Case(RUNS, "train --output its --init", "is the input",
         argv=lambda w: _train(w, recipe="visor-stage1", source=("--init", str(w.stock)), output=w.stock)),
    Case(RUNS, "train into a folder another run trains into", "is in use: another run (pid ",
         argv=lambda w: _train(w, output=w.locked)),
    Case(RUNS, "train --resume into a folder another run trains into", "is in use: another run (pid ",
         argv=lambda w: _train(w, "--resume", output=w.locked)),
    # 4. the policy commands
    Case(POLICY, "policy train --output a file", "is a file, not a folder", argv=lambda w: _policy_train(w, output=w.file)),
    Case(POLICY, "policy train --output a folder of other files", "holds files but no checkpoint",
         argv=lambda w: _policy_train(w, output=w.misc)),
    Case(POLICY, "policy train --output its model", "is the input", argv=lambda w: _policy_train(w, output=w.visor)),
    Case(POLICY, "policy train --output a folder holding its labels", "labelled/labels.safetensors: writing there",
         argv=lambda w: _policy_train(w, labels=w.labelled / "labels.safetensors", output=w.labelled)),
    Case(POLICY, "policy train --steps 0", "steps must be positive",
         argv=lambda w: [*_policy_train(w)[:-2], "--steps", "0"]),
    Case(POLICY, "policy train on a stock model", "is a stock model", argv=lambda w: _policy_train(w, model=w.stock)),
    Case(POLICY, "policy train on one configuration", "nothing for a policy to choose",
         argv=lambda w: _policy_train(w, model=w.dense)),
    Case(POLICY, "labels not a safetensors file", "is not a VISOR label table",
         argv=lambda w: _policy_train(w, labels=w.file)),
    Case(POLICY, "labels a weights file", "is not a VISOR label table (metadata missing)",
         argv=lambda w: _policy_train(w, labels=w.visor / "model.safetensors")),
    Case(POLICY, "labels of another model", "was made for a different model",
         argv=lambda w: _policy_train(w, labels=w.labels_other)),
    Case(POLICY, "labels missing", "does not exist", argv=lambda w: _policy_train(w, labels=w.root / "nope.safetensors")),
    Case(POLICY, "novelty quantile 0", "must lie in (0, 1]",
         argv=lambda w: _policy_train(w, "--novelty-quantile", "0")),
    Case(POLICY, "policy train --mode bogus", "invalid choice: 'bogus'", argv=lambda w: _policy_train(w, "--mode", "bogus")),
    Case(POLICY, "policy label --batch-size 0", "batch_size must be positive",
         argv=lambda w: _policy_label(w, "--batch-size", "0")),
    Case(POLICY, "policy label --per-task 0", "per_task and batch_size must be positive, got 0",
         argv=lambda w: _policy_label(w, "--per-task", "0")),
    Case(POLICY, "policy label unknown task", "has no tasks ['nope']", argv=lambda w: _policy_label(w, "--tasks", "nope")),
    Case(POLICY, "policy label unknown suite", "unknown suite 'nope'", argv=lambda w: _policy_label(w, "--suite", "nope")),
    Case(POLICY, "policy label --output a folder", "is a folder, not a file",
         argv=lambda w: _policy_label(w, output=w.stock)),
    Case(POLICY, "policy label on one configuration", "nothing for a policy to choose",
         argv=lambda w: _policy_label(w, model=w.dense)),
    Case(POLICY, "calibrate to 200% accuracy", "percentage in [0, 100]",
         argv=lambda w: _calibrate(w, "--target-accuracy", "200")),
    Case(POLICY, "calibrate below the cheapest FLOPs", "below what the router can reach",
         argv=lambda w: _calibrate(w, "--target-flops", "1")),
    Case(POLICY, "calibrate with two targets", "not allowed with argument",
         argv=lambda w: _calibrate(w, "--target-flops", "1", "--target-accuracy", "5")),
    Case(POLICY, "report --tau 2", "must lie in [0, 1]", argv=lambda w: _report(w, "--tau", "2")),
    Case(POLICY, "calibrate --max-loss 0", "maximum loss ε must lie strictly between 0 and 1",
         argv=lambda w: _calibrate(w, "--max-loss", "0")),
    Case(POLICY, "calibrate --max-loss 1.5", "maximum loss ε must lie strictly between 0 and 1",
         argv=lambda w: _calibrate(w, "--max-loss", "1.5")),
    Case(POLICY, "calibrate --confidence 1", "confidence 1 − δ must lie strictly between 0 and 1",
         argv=lambda w: _calibrate(w, "--max-loss", "0.1", "--confidence", "1")),
    Case(POLICY, "calibrate --confidence without --max-loss", "--confidence goes with --max-loss",
         argv=lambda w: _calibrate(w, "--target-accuracy", "5", "--confidence", "0.9")),
    Case(POLICY, "calibrate on too few samples to certify", "even if the policy lost none: that takes at least 230",
         argv=lambda w: _calibrate(w, "--max-loss", "0.01", "--confidence", "0.9")),
    Case(POLICY, "calibrate with --max-loss and a FLOPs target", "not allowed with argument",
         argv=lambda w: _calibrate(w, "--target-flops", "1", "--max-loss", "0.1")),
    Case(POLICY, "policy label --reference-model a VISOR model", "the reference is a stock model",
         argv=lambda w: _policy_label(w, "--reference-model", w.visor)),
    Case(POLICY, "policy label --reference-model missing", "does not exist",
         argv=lambda w: _policy_label(w, "--reference-model", w.root / "nope")),
    Case(POLICY, "report --output a file", "is a file, not a folder", argv=lambda w: _report(w, output=w.file)),
    # 5. options the API would otherwise ignore or coerce
    Case(OPTIONS, "from_stock option typo", "did you mean 'cross_attention_layers'",
         call=lambda w: _from_stock(w, cross_atention_layers=[0])),
    Case(OPTIONS, "unknown option", "unknown VISOR option 'speed'", call=lambda w: _from_stock(w, speed=3)),
    Case(OPTIONS, "cross_attention_init bogus", "cross_attention_init must be one of",
         call=lambda w: _from_stock(w, cross_attention_init="bogus")),
    Case(OPTIONS, "duplicate configurations", "configuration 2 repeats configuration 1",
         call=lambda w: _from_stock(w, configurations=[[], [1], [1]])),
    Case(OPTIONS, "configurations not cheapest first", "from fewest to most",
         call=lambda w: _from_stock(w, configurations=[[1, 4], [1]])),
    Case(OPTIONS, "CA layer out of range", "out of range", call=lambda w: _from_stock(w, cross_attention_layers=[9])),
    Case(OPTIONS, "layer both CA and SA", "both cross-attention and self-attention",
         call=lambda w: _from_stock(w, cross_attention_layers=[1], self_attention_layers=[1, 2])),
    Case(OPTIONS, "CA heads not a divisor", "positive divisor", call=lambda w: _from_stock(w, cross_attention_key_value_heads=3)),
    Case(OPTIONS, "even CPE kernel", "positive odd number", call=lambda w: _from_stock(w, position_encoding_kernel=4)),
    Case(OPTIONS, "config and options both", "either visor_config or config options",
         call=lambda w: VisorForConditionalGeneration.from_stock(w.stock_model, VisorConfig.dense(w.stock_model.config),
                                                                 router_mode="softmax")),
    Case(OPTIONS, "configuration 1.5", "configuration 1.5 does not exist", call=lambda w: _forward(w, configuration=1.5)),
    Case(OPTIONS, "configuration True", "configuration True does not exist", call=lambda w: _forward(w, configuration=True)),
    Case(OPTIONS, "configuration 9", "configuration 9 does not exist", call=lambda w: _forward(w, configuration=9)),
    Case(OPTIONS, "configuration 'fast'", 'or "auto"', call=lambda w: _forward(w, configuration="fast")),
    Case(OPTIONS, "configurations for another batch size", "has 2 entries for a batch of 1",
         call=lambda w: _forward(w, configuration=[0, 1])),
    Case(OPTIONS, "generate() configuration 1.5", "configuration 1.5 does not exist",
         call=lambda w: w.visor_model.generate(input_ids=torch.tensor([[1, 5]]), configuration=1.5, max_new_tokens=2)),
    Case(OPTIONS, "generate() configurations [0, 'a']", "configuration 'a' does not exist",
         call=lambda w: w.visor_model.generate(input_ids=torch.tensor([[1, 5], [1, 6]]), configuration=[0, "a"],
                                               max_new_tokens=2)),
    Case(OPTIONS, "generate() configurations [0, True]", "configuration True does not exist",
         call=lambda w: w.visor_model.generate(input_ids=torch.tensor([[1, 5], [1, 6]]), configuration=(0, True),
                                               max_new_tokens=2)),
    Case(OPTIONS, "configurations [0, 'a']", "configuration 'a' does not exist",
         call=lambda w: _forward(w, input_ids=torch.tensor([[1, 5], [1, 6]]), configuration=[0, "a"])),
    Case(OPTIONS, "NaN pixel values", "pixel_values hold NaN",
         call=lambda w: _with_image(w, pixel_values=torch.full((1, 5, 3, 64, 64), float("nan")))),
    Case(OPTIONS, "infinite image features", "image_features hold NaN or infinite",
         call=lambda w: _forward(w, image_features=[torch.full((4, 128), float("inf"))])),
    Case(OPTIONS, "prompt beyond the context length", "beyond the text model's context length of 4096",
         call=lambda w: _forward(w, input_ids=torch.ones(1, 4097, dtype=torch.long))),
    Case(OPTIONS, "attention mask of another shape", "attention_mask (1, 3) does not match input_ids (1, 4)",
         call=lambda w: _forward(w, attention_mask=torch.ones(1, 3))),
    Case(OPTIONS, "token id beyond the vocabulary", "input_ids must lie in",
         call=lambda w: _forward(w, input_ids=torch.tensor([[1, 99999]]))),
    Case(OPTIONS, "inputs_embeds only", "needs input_ids",
         call=lambda w: w.visor_model(inputs_embeds=torch.zeros(1, 2, 128))),
    Case(OPTIONS, "router mode bogus", "router mode must be one of",
         call=lambda w: w.visor_model.configure_router(mode="bogus")),
    Case(OPTIONS, "router threshold 1.5", "must lie in [0, 1]", call=lambda w: w.visor_model.configure_router(threshold=1.5)),
    Case(OPTIONS, "image array of floats", "uint8", call=lambda w: load_image(torch.zeros(8, 8, 3).numpy())),
    Case(OPTIONS, "image of another type", "expected a PIL image", call=lambda w: load_image(42)),
    # 6. output paths: checked before any work, nothing left behind
    Case(OUTPUTS, "demo --output a file", "is a file, not a folder", argv=lambda w: _demo(w, output=w.file)),
    Case(OUTPUTS, "demo --output under a file", "cannot be created", argv=lambda w: _demo(w, output=w.file / "demo")),
    Case(OUTPUTS, "demo with a CA layer out of range", "cross_attention_layers [99] out of range",
         argv=lambda w: _demo(w, "--cross-attention-layers", "99")),
    Case(OUTPUTS, "demo --threads -1", "threads must be positive", argv=lambda w: _demo(w, "--threads", "-1")),
    Case(OUTPUTS, "demo --fresh on a folder that is not a demo's", "not a visor demo folder",
         argv=lambda w: _demo(w, "--fresh", output=w.stock)),
    Case(OUTPUTS, "demo --router-mode bogus", "invalid choice", argv=lambda w: _demo(w, "--router-mode", "bogus")),
    Case(OUTPUTS, "bench --output a file", "is a file, not a folder", argv=lambda w: _bench(w, output=w.file)),
    Case(OUTPUTS, "analyze --output a file", "is a file, not a folder", argv=lambda w: _analyze(w, output=w.file)),
    Case(OUTPUTS, "preview --output a folder", "is a folder, not a file", argv=lambda w: _preview(w, output=w.stock)),
    Case(OUTPUTS, "preview --output not an image", "needs an image suffix",
         argv=lambda w: _preview(w, output=w.out / "sheet.txt")),
    Case(OUTPUTS, "preview --output under a file", "cannot be created",
         argv=lambda w: _preview(w, output=w.file / "sheet.png")),
    Case(OUTPUTS, "policy train --output under a file", "cannot be created",
         argv=lambda w: _policy_train(w, output=w.file / "policy")),
    Case(OUTPUTS, "convert --output its --model", "is the input", argv=lambda w: _convert(w, w.stock)),
    Case(OUTPUTS, "convert --output its --model as DIR/./", "is the input",
         argv=lambda w: _convert(w, f"{w.stock}/./")),
    Case(OUTPUTS, "convert --output a link to its --model", "is the input", argv=lambda w: _convert(w, w.stock_link)),
    Case(OUTPUTS, "convert --output its --model by a relative path", "is the input",
         argv=lambda w: _convert(w, os.path.relpath(w.stock))),
    Case(OUTPUTS, "convert --output a folder holding its --model", "holds the input",
         argv=lambda w: _convert(w, w.root)),
    Case(OUTPUTS, "convert --output another model's folder", "holds a checkpoint and other things (README.md)",
         argv=lambda w: _convert(w, w.readme_model)),
    # 7. malformed input
    Case(MALFORMED, "decompression bomb", "too large to decode", argv=lambda w: _generate(w, w.policy, image=w.bomb)),
    Case(MALFORMED, "not an image", "not an image file Pillow can read",
         argv=lambda w: _generate(w, w.policy, image=w.file)),
    Case(MALFORMED, "truncated image", "truncated or corrupt",
         argv=lambda w: _generate(w, w.policy, image=w.truncated_image)),
    Case(MALFORMED, "missing image", "does not exist", argv=lambda w: _generate(w, w.policy, image=w.root / "nope.png")),
    Case(MALFORMED, "question beyond the context length", "beyond the text model's context length",
         argv=lambda w: [*_generate(w, w.policy)[:-1], "red " * 5000]),
    Case(MALFORMED, "empty question", "non-empty text", argv=lambda w: [*_generate(w, w.policy)[:-1], ""]),
    Case(MALFORMED, "--configuration 1.5", "must be 'auto' or an index", argv=lambda w: _generate(w, w.policy,
                                                                                                 "--configuration", "1.5")),
    Case(MALFORMED, "--configuration 9", "configuration 9 does not exist",
         argv=lambda w: _generate(w, w.policy, "--configuration", "9")),
    Case(MALFORMED, "--max-new-tokens 0", "max_new_tokens", argv=lambda w: _generate(w, w.policy, "--max-new-tokens", "0")),
    Case(MALFORMED, "preview --size 0 0", "32 to 4096 px a side", argv=lambda w: _preview(w, "--size", "0", "0")),
    Case(MALFORMED, "preview --size 100000 100000", "32 to 4096 px a side",
         argv=lambda w: _preview(w, "--size", "100000", "100000")),
    Case(MALFORMED, "preview --count 0", "--count must be at least 1", argv=lambda w: _preview(w, "--count", "0")),
    Case(MALFORMED, "preview --frames of an image task", "--frames is for video tasks",
         argv=lambda w: _preview(w, "--frames", "4")),
    Case(MALFORMED, "preview which_frame --frames 1", "which_frame: frames must be in 2..9",
         argv=lambda w: ["data", "preview", "--task", "which_frame", "--output", str(w.out / "strip.png"),
                         "--frames", "1"]),
    Case(MALFORMED, "bench --device cuda:7", "device 'cuda:7'", argv=lambda w: _bench(w, "--device", "cuda:7")),
    Case(MALFORMED, "bench --visual-tokens 0", "must be positive", argv=lambda w: _bench(w, "--visual-tokens", "0")),
    Case(MALFORMED, "bench --visual-tokens 1000000000", "1000000000 visual tokens the bench needs at least",
         argv=lambda w: _bench(w, "--visual-tokens", "1000000000")),
    Case(MALFORMED, "bench --batch-sizes 100000000", "ask for fewer visual tokens or smaller batches",
         argv=lambda w: _bench(w, "--visual-tokens", "64", "--batch-sizes", "100000000")),
    Case(MALFORMED, "bench --dtype bogus", "invalid choice: 'bogus'", argv=lambda w: _bench(w, "--dtype", "bogus")),
    Case(MALFORMED, "bench --video-frames 0", "video frames must be positive counts, got [0]",
         argv=lambda w: _bench(w, "--video-frames", "0")),
    Case(MALFORMED, "bench --video-frames with --visual-tokens", "one image of --visual-tokens or one video of "
         "--video-frames, not both", argv=lambda w: _bench(w, "--video-frames", "8", "--visual-tokens", "64")),
    Case(MALFORMED, "bench --video-frames 100000000", "at 100000000 frames (1600000001 visual tokens) the bench needs "
         "at least", argv=lambda w: _bench(w, "--video-frames", "100000000")),
    Case(MALFORMED, "bench Qwen2.5-VL --video-frames --baselines 2", "are not ported to Qwen2_5_VL models",
         argv=lambda w: ["bench", "--preset", "tiny-qwen2.5-vl", "--video-frames", "2", "--baselines", "2",
                         "--output", str(w.out)]),
    Case(MALFORMED, "bench --preset tiny-qwen2-vl --video-frames 8", "Qwen2VL takes no video",
         argv=lambda w: ["bench", "--preset", "tiny-qwen2-vl", "--video-frames", "8", "--output", str(w.out)]),
    Case(MALFORMED, "bench --engine vllm --video-frames 8", "--video-frames run with the default engine",
         argv=lambda w: _bench(w, "--engine", "vllm", "--video-frames", "8")),
    Case(MALFORMED, "bench --train --video-frames 8", "--video-frames belong to the inference bench",
         argv=lambda w: _train_bench(w, "--video-frames", "8")),
    Case(MALFORMED, "bench --preset bogus", "bogus", argv=lambda w: ["bench", "--preset", "bogus", "--output", str(w.out)]),
    Case(MALFORMED, "train --set learning_rate=abc", "cannot use 'abc'", argv=lambda w: _train(w, "--set", "learning_rate=abc")),
    Case(MALFORMED, "train --set max_grad_norm=nan", "max_grad_norm must be finite, got nan",
         argv=lambda w: _train(w, "--set", "max_grad_norm=nan")),
    Case(MALFORMED, "train --set learning_rate=inf", "learning_rate must be finite, got inf",
         argv=lambda w: _train(w, "--set", "learning_rate=inf")),
    Case(MALFORMED, "train --set configuration_weights=[1, .nan]", "configuration_weights must be finite",
         argv=lambda w: _train(w, "--set", "configuration_weights=[1, .nan]")),
    Case(MALFORMED, "train --config holding a NaN", "adam_epsilon must be finite, got nan",
         argv=lambda w: _train(w, "--config", w.nan_config)),
    Case(MALFORMED, "llava image through ..", "images/../../red.png lies outside the image root",
         argv=lambda w: _train_on(w, "parent")),
    Case(MALFORMED, "llava image by an absolute path", "red.png lies outside the image root",
         argv=lambda w: _train_on(w, "absolute")),
    Case(MALFORMED, "llava image through a symbolic link", "images/link.png lies outside the image root",
         argv=lambda w: _train_on(w, "symlink")),
    Case(MALFORMED, "llava record with an empty answer", "record 1 (id r1): assistant turn 1 is empty",
         argv=lambda w: _train_on(w, "empty-answer")),
    Case(MALFORMED, "llava corrupt image", "corrupt.png is not an image file Pillow can read",
         argv=lambda w: _train_on(w, "corrupt")),
    Case(MALFORMED, "llava 0-byte image", "empty.png is not an image file Pillow can read",
         argv=lambda w: _train_on(w, "empty-file")),
    Case(MALFORMED, "llava truncated image", "truncated.png is truncated or corrupt",
         argv=lambda w: _train_on(w, "truncated")),
    Case(MALFORMED, "llava decompression bomb", "bomb.png is too large to decode", argv=lambda w: _train_on(w, "bomb")),
    Case(MALFORMED, "llava 1x1 image", "dot.png is 1x1 px, smaller than one 8x8 vision patch",
         argv=lambda w: _train_on(w, "dot")),
    Case(MALFORMED, "llava corrupt held-out image", f"record {HELD_OUT} (id r{HELD_OUT}): image 0: ",
         argv=lambda w: _train_on(w, "corrupt-held-out")),
    Case(MALFORMED, "train --set num_threads=-1", "num_threads", argv=lambda w: _train(w, "--set", "num_threads=-1")),
    Case(MALFORMED, "train --set an unknown key", "speed", argv=lambda w: _train(w, "--set", "speed=3")),
    Case(MALFORMED, "train --max-steps -1", "max_steps must be positive", argv=lambda w: _train(w, "--max-steps", "-1")),
    Case(MALFORMED, "train --config missing", "nope.yaml", argv=lambda w: _train(w, "--config", str(w.root / "nope.yaml"))),
    Case(MALFORMED, "train unknown recipe", "unknown recipe 'bogus'", argv=lambda w: _train(w, recipe="bogus")),
    Case(MALFORMED, "train unknown data", "matches nothing", argv=lambda w: [*_train(w)[:4], "nonsense", *_train(w)[5:]]),
    Case(MALFORMED, "train InternVL3 on the video suite", "InternVL models take no video",
         argv=lambda w: [*_train(w, source=("--model", "tiny-internvl3"))[:4], "synthetic@video",
                         *_train(w, source=("--model", "tiny-internvl3"))[5:]]),
    Case(MALFORMED, "lmms-eval video task of no clips", "per_task must be positive",
         call=lambda w: write_task(w.out / "lmms", suite="video", per_task=0)),
    Case(MALFORMED, "train unknown preset", "unknown preset 'bogus'", argv=lambda w: _train(w, source=("--model", "bogus"))),
    Case(MALFORMED, "analyze --per-task 0", "per_task must be at least 1", argv=lambda w: _analyze(w, "--per-task", "0")),
    Case(MALFORMED, "analyze --span-lengths 99", "span lengths [99] out of range 1..6",
         argv=lambda w: _analyze(w, "--span-lengths", "99")),
    Case(MALFORMED, "analyze --train-steps 1", "train_steps must be two positive step counts",
         argv=lambda w: _analyze(w, "--train-steps", "1")),
    Case(MALFORMED, "bench --configurations 99", "configurations [99] do not exist",
         argv=lambda w: _bench(w, "--configurations", "99")),
    Case(MALFORMED, "bench --baselines 0.5", "baseline FLOPs ratios must be >= 1",
         argv=lambda w: _bench(w, "--baselines", "0.5")),
    Case(MALFORMED, "bench --engine vllm --baselines 2", "--baselines run with the default engine",
         argv=lambda w: _bench(w, "--engine", "vllm", "--baselines", "2")),
    Case(MALFORMED, "bench --engine vllm --batched-prefill", "--batched-prefill run with the default engine",
         argv=lambda w: _bench(w, "--engine", "vllm", "--batched-prefill", "--batch-sizes", "2")),
    Case(MALFORMED, "bench --train --batch-sizes 4", "--batch-sizes belong to the inference bench",
         argv=lambda w: _train_bench(w, "--batch-sizes", "4")),
    Case(MALFORMED, "bench --recipes without --train", "--recipes belongs to --train",
         argv=lambda w: _bench(w, "--recipes", "full")),
    Case(MALFORMED, "bench --train --memory-limit 0", "memory limit must be positive",
         argv=lambda w: _train_bench(w, "--memory-limit", "0")),
    Case(MALFORMED, "bench --train --recipes bogus", "unknown recipe 'bogus'",
         argv=lambda w: _train_bench(w, "--recipes", "bogus")),
    Case(MALFORMED, "bench --train --visual-tokens 64 (one crop)", "no image runs exactly 1 crops",
         argv=lambda w: _train_bench(w, "--visual-tokens", "64")),
    Case(MALFORMED, "serve --configuration 9", "configuration 9 does not exist: this model has configurations",
         argv=lambda w: ["serve", "--model", w.visor, "--configuration", "9"]),
    Case(MALFORMED, "serve a stock model", "a stock model: `visor convert` makes a VISOR one",
         argv=lambda w: ["serve", "--model", w.stock]),
    Case(MALFORMED, "serve --configuration auto, untrained router", "needs a trained router",
         argv=lambda w: ["serve", "--model", w.visor, "--configuration", "auto"]),
    Case(MALFORMED, "serve --configuration bogus", "expected a configuration index or 'auto'",
         argv=lambda w: ["serve", "--model", w.visor, "--configuration", "bogus"]),
    Case(MALFORMED, "demo --training-data nonsense", "matches nothing",
         argv=lambda w: _demo(w, "--training-data", "nonsense")),
    Case(MALFORMED, "demo --suite nonsense", "unknown suite 'nonsense'", argv=lambda w: _demo(w, "--suite", "nonsense")),
    Case(MALFORMED, "demo --cross-attention-heads 3", "positive divisor",
         argv=lambda w: _demo(w, "--cross-attention-heads", "3")),
    Case(MALFORMED, "analyze a VISOR model", "is a VISOR checkpoint", argv=lambda w: _analyze(w, model=w.visor)),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, lock_holder):
    return World(tmp_path_factory.mktemp("bad-input"), lock_holder)


@pytest.mark.parametrize("case", CASES, ids=[f"{case.kind}: {case.name}" for case in CASES])
def test_bad_input_is_refused_cleanly(world, case, capsys):
    before = world.snapshot()
    if case.argv is not None:
        capsys.readouterr()
        try:
            code = cli.main([str(arg) for arg in case.argv(world)])
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
        captured = capsys.readouterr()
        assert code == 2, f"exit code {code}; stderr: {captured.err}"
        assert case.match in captured.err, captured.err
        assert "Traceback" not in captured.err + captured.out
    else:
        with pytest.raises(ValueError) as raised:
            case.call(world)
        assert case.match in str(raised.value), str(raised.value)
    assert world.snapshot() == before, "the case changed files"


def test_the_table_covers_every_class_and_at_least_80_cases():
    kinds = {case.kind for case in CASES}
    assert kinds == {WEIGHTS, ROUTER, RUNS, POLICY, OPTIONS, OUTPUTS, MALFORMED}
    assert len(CASES) >= 80 and len({case.name for case in CASES}) == len(CASES)


def test_the_same_commands_work_on_good_input(world, tmp_path):
    """The cases are refused for what is bad in them: the good versions run (resume of the finished run too)."""
    shutil.copytree(world.run, tmp_path / "run")
    assert cli.main(_resume(output=tmp_path / "run")(world)) == 0
    assert cli.main(_generate(world, world.policy)) == 0
    shutil.copytree(world.visor, tmp_path / "policy")  # a checkpoint folder: replaced, as a whole
    assert cli.main(_policy_train(world, output=tmp_path / "policy")) == 0
    assert (tmp_path / "policy" / "tokenizer_config.json").is_file()  # so `visor generate --model` takes it as is
    assert cli.main(_generate(world, tmp_path / "policy")) == 0
    assert cli.main(_preview(world, output=tmp_path / "sheet.png")) == 0
    quick = ["--set", "batch_size=1", "--set", "samples_per_task=1", "--set", "mixed_precision=no", "--no-progress"]
    assert cli.main(_train_on(world, "corrupt", *quick, "--set", "skip_broken_records=true",
                              output=tmp_path / "skipped")) == 0
    assert json.loads((tmp_path / "skipped" / "training_summary.json").read_text())["skipped_records"] == 1
    assert cli.main(_train_on(world, "symlink", *quick, "--images-outside-root", output=tmp_path / "outside")) == 0
    assert not (tmp_path / "outside" / ".lock").exists()
    model = VisorForConditionalGeneration.from_pretrained(world.policy)
    assert model.router.trained and model.config.router_training["samples"] == len(LabelTable.load(world.labels))
