"""`visor serve`: vLLM's OpenAI-compatible server on a VISOR checkpoint: one configuration, or the router's choice.

    visor serve --model DIR                         # the largest configuration, on port 8000
    visor serve --model DIR --configuration auto    # the router picks a configuration per request
    visor serve --model DIR --configuration 0 --port 8001 -- --max-num-seqs 64   # options after -- go to vLLM
    visor serve --model DIR --modality video        # LLaVA-OV: prompts take one video instead of one image

Runs in the serving environment (`make serve-setup` builds .venv-serve: vLLM pins its own transformers), where
`.venv-serve/bin/visor serve` replaces itself with `python -m vllm.entrypoints.openai.api_server` and the engine
arguments `visor.integrations.vllm.engine_arguments` gives. Ask it as any OpenAI-compatible server:
`POST /v1/chat/completions` with a user message holding one `image_url` part (a base64 data URL, or a file://
URL under vLLM's `--allowed-local-media-path`) and a text part (`--modality video`: one video part instead, which
vLLM decodes into frames). The checkpoint, the configuration and the modality are checked before vLLM starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from visor.backbones import checkpoint_config
from visor.cli import command
from visor.data.processor import folder_chat_template
from visor.integrations.vllm import check_servable, engine_arguments

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a VISOR checkpoint with vLLM (OpenAI-compatible API)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="DIR", help="a VISOR checkpoint folder with its tokenizer")
    parser.add_argument("--configuration", type=configuration_choice, default=None, metavar="N|auto",
                        help="index of the configuration every request runs (default: the largest), or auto: the "
                             "router picks one per request (a trained router)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto", help="vLLM's --dtype (default auto: the checkpoint's)")
    parser.add_argument("--modality", choices=("image", "video"), default="image",
                        help="what each prompt takes: one image (default) or, on LLaVA-OV, one video (one modality "
                             "per server: vLLM's encoder-decoder scheduler takes one)")
    parser.add_argument("vllm_options", nargs=argparse.REMAINDER, metavar="-- VLLM_OPTIONS",
                        help="further options of vLLM's server, after --")
    command(parser, _main)


def configuration_choice(text: str) -> int | str:
    """An argparse `type`: a configuration index or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a configuration index or 'auto', got {text!r}") from None


def server_command(model: str, configuration: int | str | None = None, host: str = "127.0.0.1", port: int = 8000,
                   dtype: str = "auto", vllm_options: list[str] = (), modality: str = "image") -> list[str]:
    """The argv of vLLM's server for `model` (checked first: a ValueError names what cannot be served)."""
    configuration = check_servable(checkpoint_config(model), configuration)
    argv = [sys.executable, "-m", SERVER_MODULE, "--host", host, "--port", str(port)]
    for key, value in engine_arguments(model, configuration, dtype, modality).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        else:
            argv += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    options = [option for option in vllm_options if option != "--"]
    # vLLM reads a chat template from the tokenizer or from a processor class it knows, neither of which holds the
    # template a released folder keeps in chat_template.json (or .jinja): that one is handed over.
    template = folder_chat_template(model)
    if template is not None and not any(option.split("=")[0] == "--chat-template" for option in options):
        argv += ["--chat-template", template]
    return argv + options


def _main(args) -> int:
    argv = server_command(args.model, args.configuration, args.host, args.port, args.dtype, args.vllm_options,
                          args.modality)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("vLLM is not installed in this environment; `make serve-setup` builds one "
                         "(.venv-serve/bin/visor serve runs there)")
    shown = ["'<the folder's chat template>'" if flag == "--chat-template" and "\n" in option else option
             for flag, option in zip(["", *argv], argv)]
    print(" ".join(shown), flush=True)
    os.execv(sys.executable, argv)
    return 0
