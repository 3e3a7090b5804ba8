"""`python -m visor.integrations.lmms_tasks DIR`: write the synthetic lmms-eval tasks into DIR."""

import argparse

from visor.data.tasks import SPLITS
from visor.integrations.lmms_tasks import write_task

parser = argparse.ArgumentParser(prog="python -m visor.integrations.lmms_tasks", description=write_task.__doc__)
parser.add_argument("folder", help="where to write the parquet file and the task YAMLs (pass it as --include_path)")
parser.add_argument("--suite", default="demo", help="task suite (default: demo, what the shipped checkpoint learned)")
parser.add_argument("--split", default="test", choices=SPLITS, help="splits draw from disjoint seed streams")
parser.add_argument("--per-task", type=int, default=50, help="samples per task")
parser.add_argument("--seed", type=int, default=0, help="generator seed")
args = parser.parse_args()
print(write_task(args.folder, args.suite, args.split, args.per_task, args.seed))
