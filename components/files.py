"""Writing a file so that readers never see half of it."""
from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.errors import UserError


class Discard(Exception):
    """Raised inside `atomic_path` to drop what was written without replacing the target (and without an
    error): e.g. a copy that failed its check and is fetched again another way."""


def unique_temp(path: Path, tag: str = "part", suffix: str = "") -> Path:
    """A hidden temp name beside `path`, unique per process, thread and call: several threads of one
    process may download the same content (two byte-identical files share one cache entry) at once.
    `suffix` ends the name, for writers that choose the format from it."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"
                          f"{suffix}")


@contextmanager
def atomic_path(path: str | Path, suffix: str = "", tag: str = "part") -> Iterator[Path]:
    """A fresh temp path beside `path` (`unique_temp`) to write to; it replaces `path` (os.replace, atomic
    on one filesystem) when the block ends without error and is removed otherwise. Raising `Discard` in the
    block removes it too, silently; any other exception propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp(path, tag, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except Discard:
        pass
    finally:
        tmp.unlink(missing_ok=True)


class UnwritableError(UserError):
    """A folder this program must write to cannot be written to."""


def writable_dir(path: str | Path, what: str, fix: str, *, create: bool = True) -> Path:
    """`path` created if needed (`create=False`: its nearest existing folder, left as it is) and proven
    writable (a file created and removed in it), or one line naming the folder, why it cannot be written,
    what needs it and the setting that moves it (`fix`). Being root does not help on a read-only filesystem
    or where a file stands in for the folder."""
    path = Path(path).absolute()
    probe_in = path
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        else:  # a check before anything starts: write nothing that stays
            while not probe_in.exists() and probe_in != probe_in.parent:
                probe_in = probe_in.parent
            if not probe_in.is_dir():
                raise NotADirectoryError(f"{probe_in} is a file")
        probe = unique_temp(probe_in / "write-test", tag="probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        bad = probe_in if not create else path
        reason = "a file, not a folder" if bad.exists() and not bad.is_dir() else (e.strerror or str(e))
        raise UnwritableError(f"cannot write to {bad} ({reason}): {what}; {fix}") from None
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 only asks); one of another user's counts as alive."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
