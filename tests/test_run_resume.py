"""`sam-pipeline run --resume` (pipelines/local_runs.py): which run is unfinished, and what `--resume` says
when there is none. A whole run killed mid-training and resumed: tests/test_pipeline_local.py."""
from __future__ import annotations

import json
import subprocess
import sys

from pipelines import local_runs


def test_records_say_which_run_is_unfinished(tmp_path):
    assert local_runs.unfinished(tmp_path, "a") is None
    local_runs.record(tmp_path, "r-done", "a", local_runs.SUCCEEDED)
    local_runs.record(tmp_path, "r-other", "b", local_runs.FAILED)
    assert local_runs.unfinished(tmp_path, "a") is None
    local_runs.record(tmp_path, "r-failed", "a", local_runs.FAILED)
    assert local_runs.unfinished(tmp_path, "a")["run_id"] == "r-failed"

    # A record left "running" by a process that is gone (SIGKILL) is unfinished; one whose process lives is not.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = local_runs.record(tmp_path, "r-killed", "a", local_runs.RUNNING)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "pid": dead.pid, "started": doc["started"] + 1}))
    assert local_runs.unfinished(tmp_path, "a")["run_id"] == "r-killed"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({**doc, "pid": alive.pid, "started": doc["started"] + 1}))
        assert local_runs.unfinished(tmp_path, "a")["run_id"] == "r-failed"
    finally:
        alive.kill()
        alive.wait()


def test_resume_without_an_unfinished_run_is_one_line(tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    zip_path = tmp_path / "x.zip"
    zip_path.write_bytes(b"")
    code = main(["run", "-g", "cpu", "--resume", "--dataset-source", str(zip_path), "--weights-url", str(zip_path),
                 "--pipeline-root", str(tmp_path / "outputs")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "--resume: no killed or failed run of sam_instance_seg" in err
