"""`visor serve`, as a user runs it: vLLM's OpenAI-compatible server on the tiny VISOR model (and on a Qwen2.5-VL
checkpoint as released), asked over HTTP with base64 images. Answers equal `generate()`'s; bad requests get clear errors and the server keeps serving (what cannot
be served at all is refused before vLLM starts: tests/test_bad_input.py). Skipped without vLLM, never in CI
(`make test-serve`)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

if not os.environ.get("VISOR_REQUIRE_VLLM"):
    pytest.importorskip("vllm")

from transformers import AutoTokenizer  # noqa: E402

from visor import VisorForConditionalGeneration  # noqa: E402
from visor.data import VisorProcessor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from released_checkpoints import write_open_visor_checkpoint  # noqa: E402

CONFIGURATION = 1
STARTUP_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_image():
    """A random 64 x 96 RGB image."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (64, 96, 3), generator=generator, dtype=torch.uint8).numpy())


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def running_server(folder, log: Path, configuration: int, *options: str):
    """The base URL of `visor serve` on `folder`, started as a user starts it; stopped on exit."""
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    command = [str(Path(sys.executable).parent / "visor"), "serve", "--model", str(folder),
               "--configuration", str(configuration), "--port", str(port), "--dtype", "float32", "--",
               "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(64 * 2**20), *options]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"visor serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"visor serve did not answer within {STARTUP_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(served_folders, tmp_path_factory):
    """`visor serve` on the tiny VISOR model (configuration 1)."""
    with running_server(served_folders["visor"], tmp_path_factory.mktemp("server") / "server.log",
                        CONFIGURATION) as url:
        yield url


def chat(url: str, folder, content: list[dict]) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a greedy chat completion with one user message."""
    body = json.dumps({"model": str(folder), "max_tokens": 8, "temperature": 0.0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_chat_completions_answer_as_generate_does(server, served_folders, image_questions):
    folder = served_folders["visor"]
    model = VisorForConditionalGeneration.from_pretrained(folder).eval()
    processor = VisorProcessor(model.config, AutoTokenizer.from_pretrained(folder), padding_side="left")
    for sample in image_questions[:3]:
        inputs = processor([sample.image], [sample.question])
        expected = processor.decode(model.generate(**inputs, configuration=CONFIGURATION, max_new_tokens=8,
                                                   do_sample=False)[0, inputs["input_ids"].shape[1]:])
        status, body = chat(server, folder, [{"type": "image_url", "image_url": {"url": data_url(sample.image)}},
                                             {"type": "text", "text": sample.question}])
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].strip() == expected


@pytest.mark.parametrize("bad, message", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}], "Failed to load image"),
    ([{"type": "image_url", "image_url": {"url": "IMAGE"}}] * 2, "At most 1 image"),
])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, served_folders, image_questions, bad,
                                                                     message):
    sample = image_questions[0]
    content = [{**part, "image_url": {"url": data_url(sample.image)}} if part["image_url"]["url"] == "IMAGE" else part
               for part in bad] + [{"type": "text", "text": sample.question}]
    status, body = chat(server, served_folders["visor"], content)
    assert 400 <= status < 500 and message in json.dumps(body), (status, body)
    status, body = chat(server, served_folders["visor"],
                        [{"type": "image_url", "image_url": {"url": data_url(sample.image)}},
                         {"type": "text", "text": sample.question}])
    assert status == 200, body


def test_a_question_without_an_image_is_answered(server, served_folders):
    status, body = chat(server, served_folders["visor"], [{"type": "text", "text": "what color dominates ?"}])
    assert status == 200, body


def test_a_qwen_checkpoint_as_released_is_served_over_http(tmp_path):
    """Qwen2.5-VL's chat template writes its own image tokens from typed content (the server renders the request
    with it): the answer over HTTP is the one `generate()` gives on the checkpoint's own processor."""
    folder, model = write_open_visor_checkpoint("qwen2.5-vl", tmp_path)
    processor = VisorProcessor.from_pretrained(folder, padding_side="left")
    image, question = data_image(), "what color is it ?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor.conversations([[image]], [messages], prompt_only=True)
    expected = processor.decode(model.generate(**inputs, configuration=0, max_new_tokens=8, do_sample=False,
                                               pad_token_id=processor.tokenizer.pad_token_id
                                               )[0, inputs["input_ids"].shape[1]:])
    with running_server(folder, tmp_path / "server.log", 0, "--max-model-len", "2048") as url:
        status, body = chat(url, folder, [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": question}])
    assert status == 200, body
    assert body["choices"][0]["message"]["content"].strip() == expected
