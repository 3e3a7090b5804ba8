"""A minimal deterministic `DataSource` for the training tests (no rendering, no tokenizer).

Each 64x64 image is black with one quadrant filled with one of 4 colours. Task "colour" asks for the colour,
task "where" for the quadrant; answers are one word token then EOS. Per-patch targets give the colour class of
each patch (0 = black), as the synthetic suite's do. Sample i of a split is a pure function of (seed, split, i).
Use it as `--data toy_data:build` with this folder on PYTHONPATH.
"""

from __future__ import annotations

import torch

from visor.training.batches import EvalBatch

BOS, EOS, PAD, IMAGE = 1, 2, 0, 3
QUESTION = {"colour": 10, "where": 11}
COLOUR_WORDS = [20, 21, 22, 23]
WHERE_WORDS = [30, 31, 32, 33]
WORDS = {token: f"c{i}" for i, token in enumerate(COLOUR_WORDS)} | {token: f"q{i}" for i, token in enumerate(WHERE_WORDS)}
PALETTE = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
SPLITS = {"train": 0, "validation": 1, "test": 2}


class ToyData:
    tasks = ("colour", "where")
    num_patch_classes = 5

    def __init__(self, model_config, seed: int = 0):
        vision = model_config.vision_config
        self.size = vision.image_size
        side = vision.image_size // vision.patch_size
        self.side = side
        # One 64x64 image on a grid of one crop: the base view plus one anyres crop, one newline per row.
        self.image_tokens = side * side + side * (side + 1)
        self.seed = seed

    def sample(self, split: str, index: int):
        generator = torch.Generator().manual_seed((self.seed * 3 + SPLITS[split]) * 1_000_003 + index)
        colour, quadrant, task = (int(torch.randint(n, (1,), generator=generator)) for n in (4, 4, 2))
        image = torch.full((3, self.size, self.size), -1.0)
        half = self.size // 2
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        image[:, top:top + half, left:left + half] = PALETTE[colour][:, None, None]
        image += 0.05 * torch.randn(image.shape, generator=generator)
        targets = torch.zeros(self.side, self.side, dtype=torch.long)
        cells = self.side // 2
        targets[(quadrant // 2) * cells:(quadrant // 2 + 1) * cells, (quadrant % 2) * cells:(quadrant % 2 + 1) * cells] = colour + 1
        name = self.tasks[task]
        answer = COLOUR_WORDS[colour] if name == "colour" else WHERE_WORDS[quadrant]
        return name, image, targets.flatten(), answer

    def _prompt(self, name: str) -> list[int]:
        return [BOS] + [IMAGE] * self.image_tokens + [QUESTION[name]]

    def train_batch(self, indices):
        ids, labels, pixels, targets = [], [], [], []
        for index in indices:
            name, image, target, answer = self.sample("train", index)
            prompt = self._prompt(name)
            ids.append(prompt + [answer, EOS])
            labels.append([-100] * len(prompt) + [answer, EOS])
            pixels.append(torch.stack([image, image]))
            targets.append(torch.stack([target, target]))
        count = len(indices)
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.ones(count, len(ids[0]), dtype=torch.long),
            "labels": torch.tensor(labels),
            "pixel_values": torch.stack(pixels),
            "image_sizes": torch.tensor([[self.size, self.size]] * count),
            "patch_targets": torch.stack(targets),
        }

    def eval_batches(self, split: str, per_task: int, batch_size: int):
        by_task = {name: [] for name in self.tasks}
        index = 0
        while any(len(items) < per_task for items in by_task.values()):
            name, image, _, answer = self.sample(split, index)
            if len(by_task[name]) < per_task:
                by_task[name].append((name, image, answer))
            index += 1
        items = [item for name in self.tasks for item in by_task[name]]
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            yield EvalBatch(
                tasks=[name for name, _, _ in chunk],
                inputs={
                    "input_ids": torch.tensor([self._prompt(name) for name, _, _ in chunk]),
                    "attention_mask": torch.ones(len(chunk), self.image_tokens + 2, dtype=torch.long),
                    "pixel_values": torch.stack([torch.stack([image, image]) for _, image, _ in chunk]),
                    "image_sizes": torch.tensor([[self.size, self.size]] * len(chunk)),
                },
                answers=[WORDS[answer] for _, _, answer in chunk],
            )

    def decode(self, token_ids) -> str:
        words = []
        for token in token_ids:
            if token == EOS:
                break
            words.append(WORDS.get(token, f"<{token}>"))
        return " ".join(words)


def build(model_config, seed: int = 0) -> ToyData:
    return ToyData(model_config, seed)
