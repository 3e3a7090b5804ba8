"""easy-VQA accuracy of a model by question kind: what it gets wrong, not only how often.

Greedy answers to a seeded sample of a split's questions, grouped by `visor.data.easy_vqa.question_kind`: colour,
shape, and the yes/no questions split by what they ask about, positive or negated form, and true answer. A model
that answers yes/no from the words alone scores 100% in one answer's cells and 0% in the other's. Then the
yes/no questions that name a colour the shape does not have, wrong of asked by true and named colour: a model
that compares colours by one feature (the blue channel, say) fails a block of pairs and no other.

Usage: python scripts/easy_vqa_by_kind.py MODEL_DIR [--split validation] [--questions 1200] [--configuration N]
(MODEL_DIR: a full LLaVA-OV or a VISOR checkpoint; about 30 s per 1,000 questions on 2 cores)
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import torch
from tqdm import tqdm

from visor.data import VisorProcessor, build_tokenizer
from visor.data.easy_vqa import SHAPE_COLORS, image_attributes, question_kind, question_records
from visor.data.processor import load_image
from visor.training.recipes import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder")
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    parser.add_argument("--questions", type=int, default=1200, help="questions drawn (seed 0) from the split")
    parser.add_argument("--configuration", type=int, default=None, help="VISOR configuration index")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    model = load_checkpoint(args.model, attn_implementation="eager").eval()
    tokenizer = build_tokenizer()
    processor = VisorProcessor(model.config, tokenizer, padding_side="left")
    records = question_records(args.split)
    records = random.Random(0).sample(records, min(args.questions, len(records)))
    options = {} if args.configuration is None else {"configuration": args.configuration}
    true_color = {path: color for path, _, color in image_attributes(args.split)}
    correct, total = Counter(), Counter()
    pair_wrong, pair_total = Counter(), Counter()  # absent-colour yes/no questions by (true, named) colour
    for start in tqdm(range(0, len(records), args.batch_size), desc="easy-VQA", unit="batch"):
        chunk = records[start:start + args.batch_size]
        batch = processor([load_image(path) for _, _, path in chunk], [question for question, _, _ in chunk])
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=4, do_sample=False, **options,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for (question, answer, path), tokens in zip(chunk, generated[:, batch["input_ids"].shape[1]:].tolist()):
            kind = question_kind(question, answer)
            right = processor.decode(tokens).strip() == answer
            correct[kind] += right
            total[kind] += 1
            named = next((word for word in question.rstrip("?").split() if word in SHAPE_COLORS), None)
            if kind.startswith("yes/no color") and path in true_color and named != true_color[path]:
                pair_wrong[true_color[path], named] += not right
                pair_total[true_color[path], named] += 1
    print(f"{'kind':<42}{'accuracy':>9}{'questions':>11}")
    for kind in sorted(total):
        print(f"{kind:<42}{100 * correct[kind] / total[kind]:>8.1f}%{total[kind]:>11}")
    print(f"{'all':<42}{100 * sum(correct.values()) / sum(total.values()):>8.1f}%{sum(total.values()):>11}")
    print("\nyes/no questions naming an absent colour, wrong/asked (rows: the shape's colour, columns: named)")
    print(" " * 8 + "".join(f"{color:>8}" for color in SHAPE_COLORS))
    for color in SHAPE_COLORS:
        cells = (f"{pair_wrong[color, named]}/{pair_total[color, named]}" if pair_total[color, named] else "-"
                 for named in SHAPE_COLORS)
        print(f"{color:<8}" + "".join(f"{cell:>8}" for cell in cells))


if __name__ == "__main__":
    main()
