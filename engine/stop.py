"""How a run stops when the world stops it: Ctrl-C, SIGTERM, a disk that fills or turns read-only.

Each ends on the same path as Ctrl-C: one line on stderr naming the stage, its step, its last
complete checkpoint and how to go on (``--resume``), the run directory's lock released, and an
exit code (130 Ctrl-C, 143 SIGTERM, 2 a filesystem error), never a traceback. Checkpoints are
written atomically (engine/checkpoint.py), so the last one named is always loadable.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within this block SIGTERM (``kill``, a job scheduler's preemption) raises Terminated.
    Outside the main thread signals cannot be handled: the block then changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_reason(exc: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EROFS: "use a writable filesystem",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.ENOTDIR: "a file stands where a folder is needed: move it or choose another path",
    errno.EEXIST: "a file stands where a folder is needed: move it or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: name a file",
}


def os_error_message(exc: OSError) -> str:
    """One sentence for a filesystem error: what failed, on which path, and what to do."""
    what = exc.strerror or str(exc)
    path = exc.filename if exc.filename is not None else ""
    where = f" ({path})" if path else ""
    advice = _ADVICE.get(exc.errno, "fix the problem")
    return f"{what}{where}; {advice}"
