"""`sam-pipeline run --resume` (pipelines/local_runs.py): a run killed mid-training continues from its own
latest.pt instead of starting from zero, and a new run says that a resumable one exists."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import local_runs

REPO = Path(__file__).resolve().parents[1]


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


def _iteration(path: Path) -> int | None:
    from components.training.checkpoints import load_checkpoint

    try:
        return int(load_checkpoint(path)["iteration"]) if path.is_file() else None
    except ValueError:
        return None


@pytest.mark.slow
def test_a_killed_run_resumes_at_its_checkpoint(pipeline_sources, http_server, s3_env, tmp_path, capsys):
    from pipelines.cli import main

    from components.datasets.synthetic import make_pennfudan_zip

    src, weights_sha = pipeline_sources
    base = http_server(src)
    # Four images (each split still gets its own): where training stops and resumes does not depend on how
    # many there are, and each costs an encoder pass before the first checkpoint.
    data = make_pennfudan_zip(tmp_path / "sources" / "four.zip", n_fudan=2, n_penn=2, seed=0, size_range=(64, 96))
    args = ["run", "-d", "-g", "cpu", "-n", "4", "--val-every", "2",
            "--dataset-source", f"{http_server(data.parent)}/{data.name}",
            "--weights-url", f"{base}/vit_t_random.pth", "--weights-sha256", weights_sha,
            "--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix, "--model-name", "sam-resume",
            "--pipeline-root", str(tmp_path / "outputs")]
    latest = tmp_path / "checkpoints" / "sam_instance_seg" / "latest.pt"
    # Enough iterations that the kill lands mid-training; its own session so the kill reaches kfp.local's
    # finetune subprocess too, as a killed terminal would.
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())",
                             *args, "-i", "400"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while (_iteration(latest) or 0) < 2:
            assert proc.poll() is None, "the run ended before training reached its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stopped = _iteration(latest)
    assert 2 <= stopped < 400
    (record,) = (tmp_path / "outputs" / "runs").glob("*.json")
    killed = json.loads(record.read_text())
    assert killed["state"] == local_runs.RUNNING  # nothing ran after SIGKILL

    cwd = os.getcwd()
    os.chdir(tmp_path)  # the finetune subprocess finds checkpoints/<name>/ in the working directory
    try:
        assert local_runs.unfinished(tmp_path / "outputs", "sam_instance_seg")["run_id"] == killed["run_id"]
        assert local_runs.stopped_at("sam_instance_seg", killed["run_id"]) == stopped
        summary_path = tmp_path / "summary.json"
        code = main([*args, "-i", str(stopped + 2), "--resume", "--summary-json", str(summary_path)])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert code == 0, (out + err)[-3000:]
    assert f"resuming run {killed['run_id']}" in err
    summary = json.loads(summary_path.read_text())
    assert summary["metrics"]["resumed_from"] == stopped
    assert summary["model_metadata"]["run_id"] == killed["run_id"]
    assert json.loads(record.read_text())["state"] == local_runs.SUCCEEDED
    assert local_runs.unfinished(tmp_path / "outputs", "sam_instance_seg") is None


def test_resume_without_an_unfinished_run_is_one_line(tmp_path, capsys, monkeypatch):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    zip_path = tmp_path / "x.zip"
    zip_path.write_bytes(b"")
    code = main(["run", "-g", "cpu", "--resume", "--dataset-source", str(zip_path), "--weights-url", str(zip_path),
                 "--pipeline-root", str(tmp_path / "outputs")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "--resume: no killed or failed run of sam_instance_seg" in err
