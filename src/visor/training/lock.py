"""One run at a time in a training folder: an exclusive lock (`fcntl.flock`) on `OUTPUT/.lock`, which holds the
holder's pid, taken before anything is written and held until the run ends. A second run into the folder, with
or without `--resume`, is refused, naming that pid; without the lock both would run, interleave metrics.jsonl
and overwrite each other's checkpoints.

The kernel releases the lock when its process ends, however it ends (SIGKILL included), so a lock file left by a
killed run is taken over by the next one. A release removes the file, and the folders taking the lock created,
when they are still empty: a run refused after taking it leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class RunLock:
    """The lock on `folder` (created if missing); a ValueError naming the holder's pid when another process holds
    it. `release()` gives it back."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        self.path = folder / LOCK_FILE
        self._created = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                self._remove_created()
                raise ValueError(f"{folder} is in use: another run (pid {holder}) holds its lock {self.path}; wait "
                                 "for it to end, or choose another --output") from None
            if _same_file(descriptor, self.path):
                break
            os.close(descriptor)  # locked a file its holder removed on release: lock the one there now
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        if self._descriptor is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # it holds something now: leave it and its parents
                break


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
