"""Two `sam-pipeline run` processes started at once in one working folder: each reads its own task states,
registers its own version and keeps it (issue 19 §2). Real processes, real kfp.local, the real S3 server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until

REPO = Path(__file__).resolve().parents[1]


def _server_gone(folder: Path, limit: float = 30.0) -> bool:
    from components.s3server import is_up

    endpoint = json.loads((folder / "local_outputs" / "store" / "server.json").read_text())["endpoint"]
    return wait_until(lambda: not is_up(endpoint), limit, every=0.5)


@pytest.mark.slow
def test_two_runs_at_once_in_one_folder_register_and_keep_v1_and_v2(tmp_path):
    from pipelines.local import make_demo_assets

    make_demo_assets(tmp_path / "runs" / "demo", images=12)  # made once: both runs then only read them
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAM_MODELS": str(tmp_path / "models")}
    # --margin -1: the second run to evaluate meets the first's model as champion and must still register.
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "--demo", "-d", "-i", "2", "-g", "cpu",
                               "--margin", "-1", "--summary-json", f"s{i}.json"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    summaries = [json.loads((tmp_path / f"s{i}.json").read_text()) for i in range(2)]
    assert sorted(s["registered"]["version"] for s in summaries) == ["v1", "v2"], outputs
    for s, out in zip(summaries, outputs):
        version = s["registered"]["version"]
        assert f"registered sam-demo {version}" in out
        # the progress bar names its numbers and shows none before there is one
        assert "val box Dice=" in out and "train loss=" in out and "nan" not in out
        assert Path(s["registered_copy"]["model"]).is_file()  # kept after the store stopped
        assert all(i["state"] in ("SUCCEEDED", "SKIPPED") for i in s["tasks"].values())
        for report in s["reports"].values():  # its own reports, in its own folder
            assert Path(report).is_relative_to(s["run_dir"]) and report in out
    assert summaries[0]["run_dir"] != summaries[1]["run_dir"]
    assert summaries[0]["object_store"]["endpoint"] == summaries[1]["object_store"]["endpoint"]  # one store
    registry = tmp_path / "local_outputs" / "registry" / "models" / "sam-demo"
    assert sorted(p.name for p in registry.iterdir() if p.is_dir()) == ["v1", "v2"]
    assert _server_gone(tmp_path), "the shared S3 server outlived the runs"


@pytest.mark.slow
def test_a_run_that_cannot_keep_its_model_exits_non_zero(tmp_path):
    """A version folder appeared in the local registry while the folder's store ran without it (copied in by
    hand): the run registers that number in the store, cannot keep it, and says so with a non-zero exit."""
    from pipelines import local_store
    from pipelines.local import make_demo_assets

    make_demo_assets(tmp_path / "runs" / "demo", images=12)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAM_MODELS": str(tmp_path / "models")}
    root = tmp_path / "local_outputs"
    with local_store.shared_store(root, bucket="mlpipeline", prefix="sam-pipeline/"):  # the store is running
        planted = root / "registry" / "models" / "sam-demo" / "v1"
        planted.mkdir(parents=True)
        (planted / "model.pt").write_bytes(b"someone else's model")
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--demo", "-d", "-i", "1", "-g", "cpu"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("sam-pipeline: error: registered sam-demo v1 but could not keep it: ") and str(planted) in err
    assert (planted / "model.pt").read_bytes() == b"someone else's model"
