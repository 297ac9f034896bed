"""One process per run directory.

Two runs writing the same directory interleave metrics.jsonl and overwrite each other's
checkpoints, so a run holds an exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` (the file
holds the owner's pid) for as long as it trains. The kernel drops a flock when its process
dies, however it dies, so a lock left by a killed run is never stale: the next run simply
takes it over (and says so). Within one process the lock is re-entrant (a pipeline's
stages share it).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from pathlib import Path

from .stop import os_error_message

LOCK_NAME = ".lock"


class RunDirLocked(ValueError):
    """Another live process holds the run directory."""


class RunDirUnwritable(ValueError):
    """The run directory cannot be created or written (checked before any model loads)."""


def _probe_writable(run_dir: Path) -> None:
    """Create and remove one file: the lock file alone may be writable in a folder that is not
    (or on a filesystem remounted read-only), and every checkpoint needs new files."""
    fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-test-")
    os.close(fd)
    os.remove(probe)


_held: dict[Path, list] = {}  # resolved lock path -> [open file, holders]
_mutex = threading.Lock()


def _read_pid(fh) -> int | None:
    fh.seek(0)
    text = fh.read().strip()
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Held until :meth:`release` (idempotent) or process exit. Use :func:`lock_run_dir`."""

    def __init__(self, path: Path):
        self.path, self._released = path, False

    def release(self) -> None:
        with _mutex:
            if self._released:
                return
            self._released = True
            entry = _held.get(self.path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:  # last holder in this process: unlock (the file stays, see module doc)
                del _held[self.path]
                fh = entry[0]
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir) -> RunLock:
    """Take the run directory (creating it), or raise RunDirLocked naming the holder's pid."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirUnwritable(f"--run-dir {run_dir} is a file, not a directory; choose another path or move "
                               "the file")
    path = (run_dir / LOCK_NAME).absolute()
    with _mutex:
        if path.resolve() in _held:
            _held[path.resolve()][1] += 1
            return RunLock(path.resolve())
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            _probe_writable(run_dir)
            # never unlinked: unlinking a lock file lets two processes lock two different inodes
            fh = open(path, "a+")
        except OSError as exc:  # read-only filesystem, no permission, a file in the path...
            raise RunDirUnwritable(f"cannot write the run directory {run_dir}: {os_error_message(exc)}, "
                                   "or choose another --run-dir") from None
        path = path.resolve()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fh)
            fh.close()
            who = f"process {holder}" if holder is not None else "another process"
            raise RunDirLocked(f"run directory {run_dir} is in use by {who} (lock {path}); wait for it to "
                               "finish or choose another --run-dir") from None
        previous = _read_pid(fh)
        if previous is not None and previous != os.getpid() and not _pid_alive(previous):
            print(f"[rlfuse] taking over the lock of {run_dir} left by process {previous}, which is gone")
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        os.chmod(path, 0o644)
        _held[path] = [fh, 1]
    return RunLock(path)
