"""`visor convert`: a stock checkpoint folder becomes a VISOR checkpoint folder, ready to train or check.

    visor convert --model /models/llava-onevision-qwen2-0.5b-ov-hf --output runs/ov-visor
    visor convert --model DIR --output DIR --cross-attention-layers 0,8,16 --self-attention-layers 1,9,17
    visor convert --model DIR --output DIR --dense        # every layer SA, no CA block: equal to the stock model

The weights are read once, straight into the VISOR model (transformers' loader on the meta device; no second
full copy), every stock tensor must fit, and only VISOR's new modules start fresh (gated CA blocks and the CPE
start as no-ops; `--cross-attention-init host` copies each host layer's attention instead). The output holds
the model with the source folder's tokenizer, chat template and processor configuration, so `visor generate`,
`visor train --init` and lmms-eval take it as it is. The router of a converted model is untrained: train the
model (`visor train`) and its router (`visor policy label` / `train`) before asking for `--configuration auto`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from visor.cli import comma_separated, command, key_value_heads
from visor.config import CROSS_ATTENTION_INITS
from visor.files import PROCESSOR_FILES, TOKENIZER_FILES, atomic_folder


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="turn a stock checkpoint folder into a VISOR checkpoint folder",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="DIR", help="a stock checkpoint folder (safetensors)")
    parser.add_argument("--output", required=True, metavar="DIR", help="the VISOR checkpoint folder to write")
    parser.add_argument("--cross-attention-layers", type=comma_separated(int, "layer indices"), default=None,
                        metavar="I,J", help="layers with a CA block in front (default: L/3, evenly spread)")
    parser.add_argument("--self-attention-layers", type=comma_separated(int, "layer indices"), default=None,
                        metavar="I,J", help="SA candidates, nested into configurations (default: the layer after "
                                            "each CA layer)")
    parser.add_argument("--cross-attention-heads", type=key_value_heads, default=None, metavar="N|host",
                        help="key/value heads of each CA block (default host: as many as the host layer)")
    parser.add_argument("--cross-attention-init", choices=CROSS_ATTENTION_INITS, default="zero",
                        help="zero: fresh CA blocks behind closed gates (default); host: copies of the host "
                             "layers' attention")
    parser.add_argument("--dense", action="store_true",
                        help="every layer SA and no CA block: the configuration that equals the stock model")
    command(parser, _main, output="model", reads=("model",))


def convert(model_dir: str | Path, output: str | Path, cross_attention_layers=None, self_attention_layers=None,
            cross_attention_key_value_heads: int | None = None, cross_attention_init: str = "zero",
            dense: bool = False) -> Path:
    """Write the VISOR conversion of the stock checkpoint in `model_dir` to `output` (atomically); returns it."""
    from visor.training.recipes import checkpoint_family

    module, holds_visor = checkpoint_family(model_dir)
    if holds_visor:
        raise ValueError(f"{model_dir} is already a VISOR checkpoint")
    visor_class = module.VISOR_MODEL
    stock_config = module.BACKBONE.stock_model_class.config_class.from_pretrained(model_dir, local_files_only=True)
    shape = dict(cross_attention_layers=cross_attention_layers, self_attention_layers=self_attention_layers,
                 cross_attention_key_value_heads=cross_attention_key_value_heads)
    if dense:
        if any(value is not None for value in shape.values()) or cross_attention_init != "zero":
            raise ValueError("--dense has no CA blocks and every layer SA: it takes no layer, head or init options")
        visor_config = visor_class.config_class.dense(stock_config)
    else:
        visor_config = visor_class.config_class.from_stock_config(
            stock_config, **{key: list(value) if isinstance(value, tuple) else value for key, value in shape.items()},
            cross_attention_init=cross_attention_init)
    return save_next_to_processor(visor_class.from_stock(model_dir, visor_config), output, model_dir)


def save_next_to_processor(model, output: str | Path, source: str | Path) -> Path:
    """`model` saved to `output` (atomically) with the tokenizer, chat template and processor settings that sit
    next to `source`'s weights, so the folder answers questions on its own. `output` never replaces `source`."""
    with atomic_folder(output, reads=(source,)) as folder:
        model.save_pretrained(folder)
        copy_processor(source, folder)
    return Path(output)


def copy_processor(source: str | Path, folder: str | Path) -> None:
    """The tokenizer, chat templates and processor settings next to `source`'s weights, copied into `folder` as
    they are (nothing when `source` has none), so the model reads its inputs as the source model did."""
    source, folder = Path(source), Path(folder)
    for name in (*TOKENIZER_FILES, *PROCESSOR_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _main(args) -> int:
    output = convert(args.model, args.output, args.cross_attention_layers, args.self_attention_layers,
                     args.cross_attention_heads, args.cross_attention_init, args.dense)
    from visor.modeling.visor import check_checkpoint_folder

    config = check_checkpoint_folder(output)
    print(f"wrote {output}: cross-attention layers {config['cross_attention_layers']}, configurations "
          f"{config['configurations']}")
    if not (Path(output) / "tokenizer_config.json").is_file():
        print(f"note: {args.model} has no tokenizer, so neither has {output}; `visor generate` needs one next to "
              "the weights")
    return 0
