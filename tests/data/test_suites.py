"""Named suites: the demo suite really changes the knobs and size, and asks only what its tasks can answer."""

import pytest

from visor.data.suites import SUITES, get_suite
from visor.data.tasks import SPLITS, TASKS, make_sample
from visor.data.video_tasks import VIDEO_TASKS, VideoSample


def test_standard_suite_is_the_registry_at_default_size():
    standard = get_suite("standard")
    assert standard.task_names == tuple(TASKS) and standard.size == (128, 128)


def test_demo_suite_samples_fit_their_knobs():
    demo = get_suite("demo")
    assert set(demo.task_names) == set(TASKS) - {"has_shape", "key_digit"} | {"easy_vqa"} and demo.size == (64, 64)
    for task in demo.tasks:
        for index in range(20):
            sample = make_sample(task, "train", index, size=demo.size)
            assert sample.image.size == (64, 64)
            assert sample.answer in task.answers
            if task.name == "count_marks":
                assert int(sample.answer) <= 6
            if task.name == "read_cell":
                assert sample.question.startswith("what is the ") and sample.question.endswith(" digit ?")


def test_select_and_unknown_names():
    demo = SUITES["demo"]
    assert [task.name for task in demo.select(["easy_vqa", "read_cell"])] == ["easy_vqa", "read_cell"]
    with pytest.raises(ValueError, match="has no tasks"):
        demo.select(["read_sell"])
    with pytest.raises(ValueError, match="unknown suite"):
        get_suite("huge")


def test_demo_variants_are_the_demo_tasks_at_other_knobs():
    demo, variants = get_suite("demo"), get_suite("demo-variants")
    assert variants.size == demo.size
    assert set(variants.task_names) == set(demo.task_names) - {"easy_vqa"}
    for task in variants.tasks:
        trained = demo.select([task.name])[0]
        assert task != trained, f"{task.name} is not a variant: its knobs equal the demo's"
        for index in range(10):
            sample = make_sample(task, "test", index, size=variants.size)
            assert sample.image.size == (64, 64) and sample.answer in task.answers


def test_two_hop_suites_are_the_demo_suites_plus_key_digit():
    for name, base in (("two-hop", "demo"), ("two-hop-train", "demo-train"), ("two-hop-variants", "demo-variants")):
        suite, demo = get_suite(name), get_suite(base)
        assert suite.task_names == (*demo.task_names, "key_digit") and suite.size == demo.size
        assert suite.tasks[:-1] == demo.tasks
    trained, held_out = (get_suite(name).select(["key_digit"])[0] for name in ("two-hop-train", "two-hop-variants"))
    assert trained == get_suite("two-hop").select(["key_digit"])[0] and held_out != trained


def test_video_suites_hold_the_video_tasks_and_their_held_out_variants():
    video, variants = get_suite("video"), get_suite("video-variants")
    assert video.task_names == variants.task_names == tuple(VIDEO_TASKS) and video.size == variants.size == (64, 64)
    assert video.video and variants.video and not any(SUITES[name].video for name in SUITES if "video" not in name)
    for task, held_out in zip(video.tasks, variants.tasks):
        assert held_out != task, f"{task.name} is not a variant: its knobs equal the video suite's"
        for split in SPLITS:
            sample = make_sample(held_out, split, 0, size=variants.size)
            assert isinstance(sample, VideoSample) and sample.answer in held_out.answers
            assert len(sample.frames) == 8 and {frame.size for frame in sample.frames} == {(64, 64)}
