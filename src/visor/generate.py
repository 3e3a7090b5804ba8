"""`visor generate`: answer one question about one image, and say which configuration ran and what it cost.

    visor generate --model runs/demo/policy/model --image cat.png --question "what color is the shape?"
    visor generate --model DIR --image FILE --question TEXT --configuration 0      # a fixed configuration
    visor generate --model DIR --image FILE --question TEXT --tau 0.8               # the policy, another budget
    visor generate --model DIR --video clip.gif --question TEXT --frames 8          # a video (LLaVA-OV, Qwen2.5-VL, Qwen3-VL)

The model folder holds a stock or VISOR checkpoint of a supported family (LLaVA-OV, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, InternVL3) plus its tokenizer (the demo and `visor train` save both). A video is a folder of frame
images or an animated GIF / WebP, read with Pillow and sampled uniformly to at most `--frames` (default: the
checkpoint's video settings; Qwen2.5-VL's keep every frame unless they sample, Qwen3-VL's sample by fps); its
tokens are visual tokens like an image's, so the same configurations and FLOPs apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from visor.cli import command


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer a question about an image or a video; print "
                                   "configuration and FLOPs", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder with its tokenizer")
    parser.add_argument("--image", metavar="FILE", help="the image (this, --video or both)")
    parser.add_argument("--video", metavar="PATH", help="a folder of frame images or an animated GIF / WebP")
    parser.add_argument("--frames", type=int, default=None, metavar="N",
                        help="frames sampled from the video (default: the checkpoint's video settings)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--configuration", default="auto",
                        help="VISOR only: 'auto' (the policy, default when the model has a router) or an index")
    parser.add_argument("--tau", type=float, default=None, help="policy threshold in [0, 1] (default: calibrated)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    command(parser, _main)


def answer(model_dir: str | Path, image, question: str, configuration: str | int = "auto", tau: float | None = None,
           max_new_tokens: int = 16, video=None, frames: int | None = None) -> dict:
    """The answer, the configuration that ran, its LLM prefill FLOPs and the full model's, for one question about
    an image, a video (`video`, sampled to `frames`) or both."""
    if image is None and video is None:
        raise ValueError("give an image (--image), a video (--video) or both")
    if frames is not None and video is None:
        raise ValueError("--frames samples a video: give --video too")
    if frames is not None and frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}")

    from visor.integrations.runner import CheckpointRunner

    runner = CheckpointRunner(model_dir, configuration, tau)
    result = runner.generate(None if image is None else [image], [question], max_new_tokens,
                             videos=None if video is None else [video], num_frames=frames)[0]
    return dict(answer=result.text, configuration=result.configuration,
                self_attention_layers=result.self_attention_layers, llm_prefill_flops=result.llm_prefill_flops,
                full_flops=result.full_flops, visual_tokens=result.visual_tokens, text_tokens=result.text_tokens,
                guarantee=None if runner.guarantee is None else runner.guarantee.describe())


def _main(args) -> int:
    result = answer(args.model, args.image, args.question, args.configuration, args.tau, args.max_new_tokens,
                    args.video, args.frames)
    print(f"answer: {result['answer'] or '(empty: the model ended the answer at once)'}")
    print(f"configuration: {result['configuration']} (self-attention layers {result['self_attention_layers']}), "
          f"{result['visual_tokens']} visual + {result['text_tokens']} text tokens")
    ratio = result["full_flops"] / result["llm_prefill_flops"]
    print(f"LLM prefill: {result['llm_prefill_flops'] / 1e9:.4f} GFLOPs "
          + (f"({ratio:.2f}x less than the full model)" if result["configuration"] != "full" else "(the full model)"))
    if result["guarantee"]:
        print(f"budget: {result['guarantee']}")
    return 0
