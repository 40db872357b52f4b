"""A local run's scratch folder in the system temp folder, and the clean-up of those of killed runs.

kfp.local leaves things in the system temp folder: every task's `$(mktemp -d)/ephemeral_component.py` (the
compiled command's own, never removed) and, unless given a workspace, a `kfp-workspace-*` that a killed run
keeps. A run therefore points TMPDIR (inherited by the task subprocesses) and kfp.local's workspace into
`sam-pipeline-run-<pid>-*/`, removes it when it ends, and removes those whose run is gone when it starts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from components.files import pid_alive

PREFIX = "sam-pipeline-run-"


def remove_stale(temp_root: Path | None = None) -> list[Path]:
    """Remove the scratch folders of runs whose process is gone (a SIGKILL runs no clean-up)."""
    temp_root = Path(temp_root or tempfile.gettempdir())
    removed = []
    for folder in temp_root.glob(f"{PREFIX}*"):
        pid = folder.name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def scratch(temp_root: Path | None = None) -> Iterator[Path]:
    """This run's scratch folder (with `tmp/` for TMPDIR); removed at the end, whatever happened."""
    remove_stale(temp_root)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=temp_root))
    (folder / "tmp").mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
