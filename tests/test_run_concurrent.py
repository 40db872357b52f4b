"""Two `sam-pipeline run` processes side by side in one working folder: each reads its own task states and
registers its own version or says why not (issue 19 §2), the second reads the embeddings the first stored, and a
later run finds what they stored (issue 22 §5). Real processes, real kfp.local, the real S3 server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import read_until, wait_until

REPO = Path(__file__).resolve().parents[1]
# What is shared and reused is the same at any size, and each image costs a whole encoder pass in both concurrent
# runs: six images (every split still gets its own) and four objects per iteration keep the runs short.
IMAGES = 6


def _server_gone(folder: Path, limit: float = 30.0) -> bool:
    from components.s3server import is_up

    endpoint = json.loads((folder / "local_outputs" / "store" / "server.json").read_text())["endpoint"]
    return wait_until(lambda: not is_up(endpoint), limit, every=0.5)


def _run(tmp_path: Path, env: dict, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "--demo", "--demo-images", str(IMAGES), "-d",
                             "-g", "cpu", "-n", "4", *flags],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_runs_at_once_each_register_or_say_why_and_a_later_run_finds_them(tmp_path):
    from pipelines.local import make_demo_assets
    from pipelines.local_store import objects_folder

    make_demo_assets(tmp_path / "runs" / "demo", images=IMAGES)  # made once: both runs then only read them
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAM_MODELS": str(tmp_path / "models")}
    # The second starts once the first has stored its embeddings, and reads them (it computes none); from there
    # on both run side by side: finetune, evaluate and register. --margin -1: against zero-shot either passes.
    # Whether the second to evaluate meets the other's model as its champion depends on which got there first:
    # if the other had registered by then, one test image is too few to compare with a champion
    # (components/gate.py, MIN_COMPARABLE_IMAGES) and it is refused, saying so; otherwise both register.
    first = _run(tmp_path, env, "-i", "1", "--margin", "-1", "--summary-json", "s0.json")
    head = "".join(read_until(first, "embed           finished"))
    second = _run(tmp_path, env, "-i", "1", "--margin", "-1", "--summary-json", "s1.json")
    procs = [first, second]
    outputs = [head + first.communicate(timeout=900)[0], second.communicate(timeout=900)[0]]
    assert [p.returncode for p in procs] == [0, 0], outputs
    summaries = [json.loads((tmp_path / f"s{i}.json").read_text()) for i in range(2)]
    registered = sorted(s["registered"]["version"] for s in summaries if s["registered"])
    if registered == ["v1"]:
        (refused,) = [s for s in summaries if not s["registered"]]
        assert "can be compared with champion v1" in refused["metrics"]["verdict"], refused["metrics"]
        assert refused["tasks"]["register-model"]["state"] == "SKIPPED"
    else:
        assert registered == ["v1", "v2"], outputs
    computed = [sum(shard["artifacts"]["index"]["metadata"]["computed"] for shard in s["tasks"]["embed"]["shards"])
                for s in summaries]
    assert computed == [IMAGES, 0]
    for s, out in zip(summaries, outputs):
        assert not s["registered"] or f"registered sam-demo {s['registered']['version']}" in out
        # the progress bar names its numbers and shows none before there is one
        assert "val box Dice=" in out and "train loss=" in out and "nan" not in out
        assert all(i["state"] in ("SUCCEEDED", "SKIPPED") for i in s["tasks"].values())
        for report in s["reports"].values():  # its own reports, in its own folder
            assert Path(report).is_relative_to(s["run_dir"]) and report in out
    assert summaries[0]["run_dir"] != summaries[1]["run_dir"]
    assert summaries[0]["object_store"]["endpoint"] == summaries[1]["object_store"]["endpoint"]  # one store
    assert _server_gone(tmp_path), "the shared S3 server outlived the runs"
    assert not (tmp_path / "local_outputs" / "registry").exists()  # no copies beside the store

    # A later run, on a new server of the folder: the registry's versions are there (the latest is the champion it
    # meets) and so is the dataset, so tonight's run on unchanged data stops after check-changes. That the embeddings
    # are found again is content addressing (tests/test_pipeline_local.py) over a store kept across servers
    # (tests/test_local_run.py).
    later = _run(tmp_path, env, "-i", "1", "--margin", "-1", "--summary-json", "s2.json")
    out = later.communicate(timeout=900)[0]
    assert later.returncode == 0, out
    s = json.loads((tmp_path / "s2.json").read_text())
    assert s["object_store"]["endpoint"] != summaries[0]["object_store"]["endpoint"]  # a new server
    assert s["skipped"] == f"nothing changed since sam-demo {registered[-1]}", s["tasks"]["check-changes"]
    assert (s["dataset"]["uploaded"], s["dataset"]["skipped"]) == (0, 2 * IMAGES)  # images and masks
    assert objects_folder(tmp_path / "local_outputs").is_dir()
