"""The run folder's lock: another process is refused, naming the holder's pid; a killed holder's lock is taken
over; a release leaves nothing behind."""

import os
import re

import pytest

from visor.training.lock import LOCK_FILE, RunLock


def test_a_second_process_is_refused_naming_the_holder(tmp_path, lock_holder):
    folder = tmp_path / "run"
    holder = lock_holder(folder)
    assert (folder / LOCK_FILE).read_text() == f"{holder.pid}\n"
    with pytest.raises(ValueError, match=re.escape(f"{folder} is in use: another run (pid {holder.pid}) holds")):
        RunLock(folder)
    assert (folder / LOCK_FILE).read_text() == f"{holder.pid}\n"  # the holder's lock, untouched
    holder.kill()
    holder.wait()
    lock = RunLock(folder)  # the kernel dropped the killed holder's lock; its file is taken over
    assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    lock.release()
    assert list(folder.iterdir()) == []


def test_a_release_removes_the_folders_the_lock_made(tmp_path):
    lock = RunLock(tmp_path / "new" / "run")
    with pytest.raises(ValueError, match=f"pid {os.getpid()}"):  # one process, two locks: refused as well
        RunLock(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run" / LOCK_FILE).is_file()
    lock.release()
    lock.release()
    assert list(tmp_path.iterdir()) == []
