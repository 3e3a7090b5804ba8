"""`visor data list` and `visor data preview`: what the tasks are and what the model sees."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

from visor.cli import command
from visor.data.render import INK, font
from visor.files import atomic_path
from visor.data.tasks import DEFAULT_SIZE, SPLITS, TASKS, Sample, generate_split

TILE = 256  # preview side of one sample, px
CAPTION = 44  # caption height under each tile, px


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="list the synthetic tasks or preview their samples")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    listing = commands.add_parser("list", help="each task's name, group (hard/easy) and answer space")
    command(listing, _list)
    preview = commands.add_parser("preview", help="write a contact sheet of samples with questions and answers")
    preview.add_argument("--task", required=True, choices=sorted(TASKS))
    preview.add_argument("--output", required=True, type=Path, help="PNG file to write")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--count", type=int, default=8)
    preview.add_argument("--split", default="train", choices=SPLITS)
    preview.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("HEIGHT", "WIDTH"))
    command(preview, _preview, output="file")


def _list(args: argparse.Namespace) -> int:
    for name, task in TASKS.items():
        print(f"{name:16} {task.group:5} {task.description}; answers: {' '.join(task.answers)}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    if args.output.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--output {args.output} needs an image suffix Pillow writes (e.g. .png)")
    samples = generate_split(args.split, args.count, seed=args.seed, tasks=[args.task], size=tuple(args.size))
    with atomic_path(args.output) as temporary:
        contact_sheet(samples).save(temporary, format=Image.registered_extensions()[args.output.suffix.lower()])
    print(f"wrote {len(samples)} {args.task} samples to {args.output}")
    return 0


def contact_sheet(samples: list[Sample], columns: int = 4) -> Image.Image:
    """Samples in a grid, each upscaled (nearest, so pixels stay visible) with its question and answer below."""
    columns = min(columns, len(samples))
    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), "white")
    draw_font = font(13)
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + CAPTION)
        scale = (TILE - 8) / max(sample.image.size)
        size = (max(1, round(sample.image.width * scale)), max(1, round(sample.image.height * scale)))
        sheet.paste(sample.image.resize(size, Image.NEAREST), (x + 4, y + 4))
        draw.text((x + 4, y + TILE + 2), f"Q: {sample.question}", fill=INK, font=draw_font)
        draw.text((x + 4, y + TILE + 22), f"A: {sample.answer}", fill=(180, 0, 0), font=draw_font)
    return sheet
