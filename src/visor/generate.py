"""`visor generate`: answer one question about one image, and say which configuration ran and what it cost.

    visor generate --model runs/demo/policy/model --image cat.png --question "what color is the shape?"
    visor generate --model DIR --image FILE --question TEXT --configuration 0      # a fixed configuration
    visor generate --model DIR --image FILE --question TEXT --tau 0.8               # the policy, another budget

The model folder holds a stock LLaVA-OV or a VISOR checkpoint plus its tokenizer (the demo saves both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer a question about an image; print configuration and FLOPs",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder with its tokenizer")
    parser.add_argument("--image", required=True, metavar="FILE")
    parser.add_argument("--question", required=True)
    parser.add_argument("--configuration", default="auto",
                        help="VISOR only: 'auto' (the policy, default when the model has a router) or an index")
    parser.add_argument("--tau", type=float, default=None, help="policy threshold in [0, 1] (default: calibrated)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.set_defaults(func=_main)


def answer(model_dir: str | Path, image, question: str, configuration: str | int = "auto", tau: float | None = None,
           max_new_tokens: int = 16) -> dict:
    """The answer, the configuration that ran, its LLM prefill FLOPs and the full model's, for one question."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from visor.data.processor import VisorProcessor
    from visor.flops import llm_prefill_flops, prompt_token_counts, router_flops
    from visor.training.recipes import is_visor, load_checkpoint

    hf_logging.disable_progress_bar()
    model_dir = Path(model_dir)
    model = load_checkpoint(model_dir).eval()
    if not (model_dir / "tokenizer_config.json").is_file():
        raise ValueError(f"{model_dir} has no tokenizer (tokenizer_config.json); save one next to the weights")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = dict(VisorProcessor(model.config, tokenizer, padding_side="left")(image, question))
    options, extra = {}, 0
    if is_visor(model):
        if configuration == "auto" and model.router is None:
            configuration = model.config.largest_configuration
        if configuration != "auto":
            configuration = configuration_index(configuration, len(model.config.configurations))
        else:
            extra = router_flops(model.config)
        options = dict(configuration=configuration, router_threshold=tau)
    elif configuration not in ("auto", "full") or tau is not None:
        raise ValueError("a stock LLaVA-OV model has one configuration: drop --configuration and --tau")
    text_config = model.config.text_config
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                                pad_token_id=text_config.pad_token_id, eos_token_id=text_config.eos_token_id,
                                **options)
    new_tokens = output.sequences[0, inputs["input_ids"].shape[1]:]
    ran = int(output.past_key_values.configuration[0]) if is_visor(model) else "full"
    visual, text = (int(count[0]) for count in prompt_token_counts(model.config, inputs))
    flops = llm_prefill_flops(model.config, visual, text, ran).total + extra
    full = llm_prefill_flops(model.config, visual, text, "full").total
    layers = model.config.configurations[ran] if is_visor(model) else "all"
    return dict(answer=tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), configuration=ran,
                self_attention_layers=layers, llm_prefill_flops=flops, full_flops=full, visual_tokens=visual,
                text_tokens=text)


def configuration_index(value, count: int) -> int:
    """A configuration index from user text (CLI, lmms-eval model args), with an error naming the valid range."""
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--configuration must be 'auto' or an index 0..{count - 1}, got {value!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"configuration {index} out of range 0..{count - 1}")
    return index


def _main(args) -> int:
    try:
        result = answer(args.model, args.image, args.question, args.configuration, args.tau, args.max_new_tokens)
    except (ValueError, OSError) as error:
        print(f"visor generate: error: {error}", file=sys.stderr)
        return 2
    print(f"answer: {result['answer'] or '(empty: the model ended the answer at once)'}")
    print(f"configuration: {result['configuration']} (self-attention layers {result['self_attention_layers']}), "
          f"{result['visual_tokens']} visual + {result['text_tokens']} text tokens")
    print(f"LLM prefill: {result['llm_prefill_flops'] / 1e9:.4f} GFLOPs "
          f"({result['full_flops'] / result['llm_prefill_flops']:.2f}x less than the full model)")
    return 0
