"""`visor data list` and `visor data preview`."""

from __future__ import annotations

import numpy as np
from PIL import Image

from visor.cli import main
from visor.data.tasks import TASKS


def test_list_names_every_task_with_group_and_answers(capsys):
    assert main(["data", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(TASKS)
    assert [line.split()[1] for line in lines] == [task.group for task in TASKS.values()]
    assert "yes no" in lines[-1]


def test_preview_writes_a_contact_sheet(tmp_path, capsys):
    output = tmp_path / "sheet.png"
    assert main(["data", "preview", "--task", "bar_value", "--output", str(output), "--count", "6", "--seed", "2"]) == 0
    sheet = Image.open(output)
    assert sheet.size == (4 * 256, 2 * (256 + 44))
    assert len(np.unique(np.asarray(sheet.convert("L")))) > 10  # something is drawn
