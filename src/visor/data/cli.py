"""`visor data list` and `visor data preview`: what the tasks (image and video) are and what the model sees."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

from visor.cli import command
from visor.data.render import INK, font
from visor.files import atomic_path
from visor.data.tasks import DEFAULT_SIZE, SPLITS, TASKS, Sample, generate_split
from visor.data.video_tasks import VIDEO_SIZE, VIDEO_TASKS, VideoSample, generate_video_split, get_video_task

TILE = 256  # preview side of one sample, px
FRAME_TILE = 128  # preview side of one video frame, px
FRAME_LABEL = 16  # frame-number band above each strip of frames, px
CAPTION = 44  # caption height under each tile or strip, px


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="list the synthetic tasks or preview their samples")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    listing = commands.add_parser("list", help="each task's name, group (hard/easy) and answer space")
    command(listing, _list)
    preview = commands.add_parser("preview", help="write a contact sheet of samples with questions and answers "
                                  "(for a video task, one strip of numbered frames per sample)")
    preview.add_argument("--task", required=True, choices=sorted([*TASKS, *VIDEO_TASKS]), metavar="TASK",
                         help="an image or a video task (`visor data list` names them)")
    preview.add_argument("--output", required=True, type=Path, help="PNG file to write")
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--count", type=int, default=8)
    preview.add_argument("--split", default="train", choices=SPLITS)
    preview.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                         help=f"image size, or frame size of a video task (default: {DEFAULT_SIZE[0]} "
                              f"{DEFAULT_SIZE[1]} for images, {VIDEO_SIZE[0]} {VIDEO_SIZE[1]} for frames)")
    preview.add_argument("--frames", type=int, help="frames per clip of a video task (default: the task's)")
    command(preview, _preview, output="file")


def _list(args: argparse.Namespace) -> int:
    for name, task in {**TASKS, **VIDEO_TASKS}.items():
        print(f"{name:20} {task.group:5} {task.description}; answers: {' '.join(task.answers)}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    if args.output.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--output {args.output} needs an image suffix Pillow writes (e.g. .png)")
    if args.task in VIDEO_TASKS:
        task = get_video_task(args.task, **({} if args.frames is None else {"frames": args.frames}))
        samples = generate_video_split(args.split, args.count, seed=args.seed, tasks=[task],
                                       size=tuple(args.size or VIDEO_SIZE))
        sheet = frame_strips(samples)
    else:
        if args.frames is not None:
            raise ValueError(f"--frames is for video tasks; {args.task} is an image task")
        samples = generate_split(args.split, args.count, seed=args.seed, tasks=[args.task],
                                 size=tuple(args.size or DEFAULT_SIZE))
        sheet = contact_sheet(samples)
    with atomic_path(args.output) as temporary:
        sheet.save(temporary, format=Image.registered_extensions()[args.output.suffix.lower()])
    print(f"wrote {len(samples)} {args.task} samples to {args.output}")
    return 0


def contact_sheet(samples: list[Sample], columns: int = 4) -> Image.Image:
    """Samples in a grid, each upscaled (nearest, so pixels stay visible) with its question and answer below."""
    columns = min(columns, len(samples))
    rows = math.ceil(len(samples) / columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + CAPTION)
        _paste(sheet, sample.image, x, y, TILE)
        _caption(draw, sample, x, y + TILE)
    return sheet


def frame_strips(samples: list[VideoSample]) -> Image.Image:
    """One row per clip: its frames side by side, numbered from 1 above, with the question and answer below."""
    frames = max(len(sample.frames) for sample in samples)
    row = FRAME_LABEL + FRAME_TILE + CAPTION
    sheet = Image.new("RGB", (frames * FRAME_TILE, len(samples) * row), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        y = i * row
        for number, frame in enumerate(sample.frames):
            draw.text((number * FRAME_TILE + 4, y + 2), str(number + 1), fill=INK, font=font(13))
            _paste(sheet, frame, number * FRAME_TILE, y + FRAME_LABEL, FRAME_TILE)
        _caption(draw, sample, 0, y + FRAME_LABEL + FRAME_TILE)
    return sheet


def _paste(sheet: Image.Image, image: Image.Image, x: int, y: int, tile: int) -> None:
    """`image` upscaled (nearest, so pixels stay visible) into the `tile`-px square at (x, y), 4 px in."""
    scale = (tile - 8) / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    sheet.paste(image.resize(size, Image.NEAREST), (x + 4, y + 4))


def _caption(draw: ImageDraw.ImageDraw, sample: Sample | VideoSample, x: int, y: int) -> None:
    draw.text((x + 4, y + 2), f"Q: {sample.question}", fill=INK, font=font(13))
    draw.text((x + 4, y + 22), f"A: {sample.answer}", fill=(180, 0, 0), font=font(13))
