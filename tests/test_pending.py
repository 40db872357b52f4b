"""`sam-pipeline submit --wait` notices a task pod Pending longer than --pending-limit and says why, through
the real kfp 2.17 client against the KFP API stand-in (tests/helpers.py) and a stand-in kubectl. Contract
test: the stand-in answers `kubectl get pods -l pipeline/runid=<run>` and `kubectl get events
--field-selector involvedObject.name=<pod>,reason=FailedScheduling` in the shapes of the Kubernetes v1 Pod
and Event APIs (kubernetes api/core/v1/types.go), with the scheduler's message format of
pkg/scheduler/schedule_one.go (`0/2 nodes are available: ...`) and KFP's run label
(kubeflow/pipelines 2.17.0 backend/src/apiserver/template/argo_template.go)."""
from __future__ import annotations

import json
import os
import stat
import sys
from datetime import datetime, timedelta, timezone

import pytest

from pipelines import kfp_client
from pipelines.cli import main

SCHEDULER = ("0/2 nodes are available: 1 Insufficient cpu, 1 node(s) didn't match Pod's node affinity/selector. "
             "preemption: 0/2 nodes are available: 1 No preemption victims found for incoming pod, 1 Preemption "
             "is not helpful for scheduling.")


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch):
    monkeypatch.setattr(kfp_client, "POLL_SECONDS", 0.0)


def _pod(age_s: int, waiting: str | None = None) -> dict:
    created = (datetime.now(timezone.utc) - timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                   "reason": "Unschedulable", "message": SCHEDULER}]}
    if waiting:
        status = {"phase": "Pending", "containerStatuses": [
            {"name": "main", "state": {"waiting": {"reason": waiting, "message": "image is not present"}}}]}
    return {"metadata": {"name": "sam-finetune-x7k2p-system-container-impl-3349071", "namespace": "kubeflow",
                         "creationTimestamp": created,
                         "annotations": {"workflows.argoproj.io/node-name":
                                         "sam-finetune-x7k2p.root.condition-1.finetune"}},
            "status": status}


def _kubectl(tmp_path, monkeypatch, pods: list[dict], events: list[dict]) -> os.PathLike:
    """A kubectl on PATH that logs its arguments and answers from the given objects."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "pods.json").write_text(json.dumps({"kind": "PodList", "items": pods}))
    (tmp_path / "events.json").write_text(json.dumps({"kind": "EventList", "items": events}))
    calls = tmp_path / "calls"
    script = bin_dir / "kubectl"
    script.write_text(f"""#!{sys.executable}
import sys
open({str(calls)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
kind = "pods" if "pods" in sys.argv else "events"
sys.stdout.write(open({str(tmp_path)!r} + "/" + kind + ".json").read())
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def _submit(capsys, host, *extra):
    code = main(["submit", "--host", host, "--wait", "--timeout", "300", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_task_pending_too_long_ends_the_wait_with_the_schedulers_reason(kfp_api, tmp_path, monkeypatch, capsys):
    host, world = kfp_api
    world["run_states"] = ["RUNNING"]
    event = {"reason": "FailedScheduling", "type": "Warning", "lastTimestamp": "2026-12-05T03:00:00Z",
             "message": SCHEDULER}
    calls = _kubectl(tmp_path, monkeypatch, [_pod(700)], [event])
    code, out, err = _submit(capsys, host, "--kube-context", "kind-sam-pipeline")
    run_id = out.split()[1]
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("sam-pipeline: error: task finetune (pod kubeflow/sam-finetune-x7k2p-system-container-impl")
    assert "has been Pending for 70" in err and "(limit 600 s): FailedScheduling: 0/2 nodes are available: " \
        "1 Insufficient cpu" in err and f"/#/runs/details/{run_id}" in err
    first = calls.read_text().splitlines()[0]
    assert first == f"--context kind-sam-pipeline get pods --all-namespaces -l pipeline/runid={run_id} -o json"


def test_without_an_event_the_pods_own_reason_is_given(kfp_api, tmp_path, monkeypatch, capsys):
    host, world = kfp_api
    world["run_states"] = ["RUNNING"]
    _kubectl(tmp_path, monkeypatch, [_pod(100, waiting="ErrImageNeverPull")], [])
    code, _, err = _submit(capsys, host, "--pending-limit", "60")
    assert code == 1 and "container main: ErrImageNeverPull: image is not present" in err
    assert "(limit 60 s)" in err


def test_a_pod_pending_less_than_the_limit_is_waited_for(kfp_api, tmp_path, monkeypatch, capsys):
    host, world = kfp_api
    world["run_states"] = ["PENDING", "RUNNING", "SUCCEEDED"]
    calls = _kubectl(tmp_path, monkeypatch, [_pod(30)], [])
    code, out, err = _submit(capsys, host)
    assert code == 0 and "ended SUCCEEDED" in out, err
    assert len(calls.read_text().splitlines()) == 2  # looked at the pods at each poll of the unfinished run


def test_without_kubectl_it_says_so_once_and_follows_the_run(kfp_api, tmp_path, monkeypatch, capsys):
    host, world = kfp_api
    world["run_states"] = ["RUNNING", "RUNNING", "FAILED"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl
    code, out, err = _submit(capsys, host)
    assert code == 1 and "ended FAILED" in out and err == ""
    assert out.count("not watching for Pending task pods (kubectl is not on PATH)") == 1


def test_a_zero_limit_never_runs_kubectl(kfp_api, tmp_path, monkeypatch, capsys):
    host, world = kfp_api
    world["run_states"] = ["RUNNING", "SUCCEEDED"]
    calls = _kubectl(tmp_path, monkeypatch, [_pod(10_000)], [])
    code, _, err = _submit(capsys, host, "--pending-limit", "0")
    assert code == 0 and not calls.exists() and err == ""
