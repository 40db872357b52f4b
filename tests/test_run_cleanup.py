"""What runs leave behind: nothing in the system temp folder (kfp.local's `tmp*/ephemeral_component.py`, its
`kfp-workspace-*`), whether the run ends, fails or is killed (then the next run removes it), and no empty
`data/` after a dataset URL that failed. Real runs in real processes, with their own TMPDIR to look at."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_until

REPO = Path(__file__).resolve().parents[1]


def _start(cwd: Path, env: dict, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "-g", "cpu", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture
def world(tmp_path, pipeline_sources):
    sources, sha = pipeline_sources
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(systmp), "SAM_MODELS": str(tmp_path / "models")}
    weights = ["--weights-url", str(sources / "vit_t_random.pth"), "--weights-sha256", sha]
    work = tmp_path / "work"
    work.mkdir()
    return work, systmp, env, weights, sources


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_after_the_next_and_sigterm_says_resume(world):
    work, systmp, env, weights, sources = world
    run = _start(work, env, "-d", "-i", "50", "-c", "killme", "--dataset-source", str(sources / "PennFudanPed.zip"),
                 *weights)
    read_until(run, "embed ")  # tasks have run: their temp folders exist
    assert list(systmp.glob("sam-pipeline-run-*")) and not list(systmp.glob("kfp-workspace-*"))
    os.killpg(run.pid, signal.SIGKILL)  # the run and its task subprocesses: no clean-up runs
    run.wait()
    store = json.loads((work / "local_outputs" / "store" / "server.json").read_text())["endpoint"]
    # The next run (here one whose dataset fails at once) removes what the killed one left.
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "-g", "cpu", "--dataset-source",
                           str(work / "missing.zip"), *weights], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "missing.zip: no such file or folder" in done.stderr, done.stderr
    assert sorted(p.name for p in systmp.iterdir()) == [], list(systmp.iterdir())
    from components.s3server import is_up

    assert not is_up(store), "the killed run's shared S3 server is still up"
    # SIGTERM: "interrupted" with the command that continues the run, which --resume then finds.
    run = _start(work, env, "-d", "-i", "50", "-c", "killme", "--dataset-source", str(sources / "PennFudanPed.zip"),
                 *weights)
    read_until(run, "fetch-weights")
    run.send_signal(signal.SIGTERM)
    err = run.communicate(timeout=120)[1]
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1].endswith(
        "interrupted; `sam-pipeline run --resume -c killme` (with the same flags) continues this run"), err
    assert sorted(p.name for p in systmp.iterdir()) == []


def test_a_failed_dataset_url_leaves_no_empty_data_folder(world, http_server):
    work, systmp, env, weights, sources = world
    served = work.parent / "served"
    served.mkdir()
    (served / "broken.zip").write_bytes(b"an error page, not a zip")  # reachable, downloaded, then refused
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "-g", "cpu", "--dataset-source",
                           f"{http_server(served)}/broken.zip", *weights], cwd=work,
                          env={**env, "DATA_DIR": str(work / "data")}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "ingest-dataset" in done.stderr and "zip" in done.stderr, done.stderr
    assert not (work / "data").exists()
    # A killed download's partial file is removed at the next start, and the folder with it.
    (work / "data").mkdir()
    (work / "data" / ".broken.zip.unverified-999999999-1-x").write_bytes(b"half")
    from components.datasets.sources import clean_stale_downloads

    assert clean_stale_downloads(work / "data") and not (work / "data").exists()
