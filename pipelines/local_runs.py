"""Records of local runs, so `sam-pipeline run --resume` continues one that was killed.

kfp.local draws a new run id for every run (kfp/local/placeholder_utils.py, `make_random_id()`), and the
training checkpoint's identity includes the run id, so a killed run re-run as it was would start training
from zero. `run` therefore draws its own id and passes it as the pipeline parameter `resume_run_id` (finetune
trains as that run), and keeps `<pipeline root>/runs/<id>.json` with the run's state: running, succeeded or
failed. A record still "running" whose process is gone was killed. `--resume` reuses the id of the last
unfinished run of the same checkpoint name; finetune then resumes from checkpoints/<name>/latest.pt only
if that checkpoint's identity (run id, data, weights, settings) matches, and otherwise starts fresh.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

from components.files import atomic_path, pid_alive

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"


def new_run_id() -> str:
    return f"local-{uuid.uuid4().hex[:16]}"


def _dir(pipeline_root: Path) -> Path:
    return Path(pipeline_root) / "runs"


def record(pipeline_root: Path, run_id: str, checkpoint_name: str, state: str) -> Path:
    """Write (or update) a run's record; the first write stamps when it started."""
    path = _dir(pipeline_root) / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.is_file() else {}
    doc = {"run_id": run_id, "checkpoint_name": checkpoint_name, "state": state, "pid": os.getpid(),
           "started": old.get("started", time.time()), "updated": time.time()}
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


@contextlib.contextmanager
def recorded(pipeline_root: Path, run_id: str, checkpoint_name: str):
    """Record the run as running, then as what the caller sets `outcome["state"]` to (failed unless it says
    otherwise). A SIGKILL runs no `finally`: the record stays "running" with a dead pid, which is how a
    killed run is recognised."""
    record(pipeline_root, run_id, checkpoint_name, RUNNING)
    outcome = {"state": FAILED}
    try:
        yield outcome
    finally:
        record(pipeline_root, run_id, checkpoint_name, outcome["state"])


def unfinished(pipeline_root: Path, checkpoint_name: str) -> dict | None:
    """The most recently started run of this checkpoint name that failed or was killed, or None."""
    found = []
    for path in _dir(pipeline_root).glob("*.json") if _dir(pipeline_root).is_dir() else ():
        if path.name.startswith("."):
            continue  # a record being written (atomic_path's temp file)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a record being replaced, or damaged: not one to resume
        if doc.get("checkpoint_name") != checkpoint_name or doc.get("state") == SUCCEEDED:
            continue
        if doc.get("state") == RUNNING and int(doc.get("pid", 0)) != os.getpid() and pid_alive(int(doc.get("pid", 0))):
            continue  # still going in another process
        found.append(doc)
    return max(found, key=lambda d: d.get("started", 0), default=None)


def stopped_at(checkpoint_name: str, run_id: str, root: Path = Path("checkpoints")) -> int | None:
    """The iteration of checkpoints/<name>/latest.pt when that checkpoint belongs to `run_id`, else None
    (the finetune subprocess writes it in this working directory, see local.find_checkpoints)."""
    path = root / checkpoint_name / "latest.pt"
    if not path.is_file():
        return None
    from components.training.checkpoints import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except ValueError:
        return None  # unreadable: finetune will say so and start fresh
    return int(ckpt["iteration"]) if ckpt.get("run_id") == run_id else None
