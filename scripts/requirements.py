"""Print the project's requirements (pyproject.toml), one per argument, leaving out the packages named after
--without: the serving environment takes torch and transformers from vLLM's pins (see the Makefile)."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--without", nargs="*", default=[], help="package names to leave out")
args = parser.parse_args()
requirements = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
print(" ".join(requirement for requirement in requirements
               if re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() not in args.without))
