"""The synthetic lmms-eval tasks `write_task` writes (no lmms-eval needed): what lmms-eval will read back."""

from __future__ import annotations

import datasets
import numpy as np

from visor.data.frames import load_frames
from visor.data.suites import get_suite
from visor.data.video_tasks import make_video_sample
from visor.integrations.lmms_tasks import VIDEO_DATA_FILE, VIDEO_TASK_FILE, utils


def test_a_video_suite_becomes_clips_that_load_back_frame_for_frame(video_task_folder):
    docs = datasets.load_dataset("parquet", data_files=str(video_task_folder / VIDEO_DATA_FILE), split="train")
    suite = get_suite("video")
    assert (video_task_folder / VIDEO_TASK_FILE).exists()
    assert [doc["task"] for doc in docs] == [task.name for task in suite.tasks for _ in range(2)]
    for position, doc in enumerate(docs):
        task = suite.tasks[position // 2]
        sample = make_video_sample(task, "test", position % 2, 0, suite.size)
        assert (doc["question"], doc["answer"], doc["choices"]) == (sample.question, sample.answer, list(task.answers))
        [path] = utils.doc_to_video(doc)
        frames = load_frames(path)
        assert len(frames) == len(sample.frames)
        for loaded, drawn in zip(frames, sample.frames):
            assert np.array_equal(np.asarray(loaded), np.asarray(drawn.convert("RGB")))

