"""Folders that cannot be written to are one line naming the folder, what needs it and the setting that
moves it; no traceback. Real processes on a really read-only folder (a read-only bind mount in a private
mount namespace: root cannot write there either) and a file where a folder is expected."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readonly(folder: Path, command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run `command` in `folder` made read-only by a bind mount only this command sees."""
    script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && cd {folder} && "
              f"exec {shlex.join(command)}")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)


def _can_remount() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt && mount -o remount,bind,ro /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_remount(), reason="needs unshare -m and mount (a private read-only bind mount)")
@pytest.mark.parametrize("where", ["working folder", "SAM_MODELS"])
def test_run_in_a_read_only_folder_is_one_line(where, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAM_MODELS": str(tmp_path / "models")}
    if where == "SAM_MODELS":
        env["SAM_MODELS"] = str(ro / "models")
        command = [sys.executable, "-m", "pipelines.cli", "fetch-weights", "-m", "vit_t", "--url", "/nonexistent"]
    else:
        command = [sys.executable, "-m", "pipelines.cli", "run", "--demo", "-d", "-i", "1", "-g", "cpu"]
    done = _readonly(ro, command, env)
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"sam-pipeline: error: cannot write to {ro}") and "Read-only file system" in err, err
    assert ("SAM_MODELS" in err) == (where == "SAM_MODELS") and ("writable folder" in err)
    assert not list(ro.iterdir())


@pytest.mark.parametrize("setting", ["SAM_MODELS", "--pipeline-root"])
def test_a_file_where_a_folder_is_expected_is_one_line(setting, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAM_MODELS": str(tmp_path / "models")}
    args = ["run", "--demo", "-g", "cpu"]
    if setting == "SAM_MODELS":
        env["SAM_MODELS"] = str(tmp_path / "a-file")
    else:
        args += ["--pipeline-root", str(tmp_path / "a-file" / "out")]
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 1 and "\n" not in err and "Traceback" not in err, err
    assert f"cannot write to {tmp_path / 'a-file'}" in err and setting in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing started, nothing written
