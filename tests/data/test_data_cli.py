"""`visor data list` and `visor data preview`."""

from __future__ import annotations

import numpy as np
from PIL import Image

from visor.cli import main
from visor.data.tasks import TASKS
from visor.data.video_tasks import VIDEO_TASKS


def test_list_names_every_task_with_group_and_answers(capsys):
    assert main(["data", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tasks = {**TASKS, **VIDEO_TASKS}
    assert [line.split()[0] for line in lines] == list(tasks)
    assert [line.split()[1] for line in lines] == [task.group for task in tasks.values()]
    assert "yes no" in lines[list(tasks).index("has_shape")]
    assert "circle rectangle triangle" in lines[list(tasks).index("what_changed")]


def test_preview_writes_a_contact_sheet(tmp_path, capsys):
    output = tmp_path / "sheet.png"
    assert main(["data", "preview", "--task", "bar_value", "--output", str(output), "--count", "6", "--seed", "2"]) == 0
    sheet = Image.open(output)
    assert sheet.size == (4 * 256, 2 * (256 + 44))
    assert len(np.unique(np.asarray(sheet.convert("L")))) > 10  # something is drawn


def test_preview_of_a_video_task_writes_one_strip_of_frames_per_sample(tmp_path, capsys):
    output = tmp_path / "strips.png"
    assert main(["data", "preview", "--task", "which_frame", "--output", str(output), "--count", "2",
                 "--frames", "5"]) == 0
    sheet = np.asarray(Image.open(output).convert("L"))
    assert sheet.shape == (2 * (16 + 128 + 44), 5 * 128)  # 2 rows of a number band, 5 frames and a caption
    tile = sheet[16:16 + 128, :128]
    assert len(np.unique(tile)) > 3  # a frame is drawn
    assert "wrote 2 which_frame samples" in capsys.readouterr().out


def test_preview_refuses_frames_for_an_image_task(tmp_path, capsys):
    output = tmp_path / "sheet.png"
    assert main(["data", "preview", "--task", "bar_value", "--output", str(output), "--frames", "4"]) == 2
    assert "--frames is for video tasks" in capsys.readouterr().err and not output.exists()
    assert main(["data", "preview", "--task", "which_frame", "--output", str(output), "--frames", "12"]) == 2
    assert "frames must be in 2..9" in capsys.readouterr().err and not output.exists()
