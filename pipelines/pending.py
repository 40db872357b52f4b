"""`submit --wait`'s watch for a task pod that can never start: Pending longer than a limit, with the reason
the scheduler (or the kubelet) gave, instead of waiting out the whole timeout in silence.

KFP's API says only that the run is RUNNING; the pods say why it is not moving. Every pod of a run carries the
label `pipeline/runid=<run id>` (kubeflow/pipelines 2.17.0 backend/src/apiserver/template/argo_template.go,
`SetPodMetadataLabels(util.LabelKeyWorkflowRunId, ...)`, the key from backend/src/common/util/consts.go). The
reason is the pod's latest `FailedScheduling` event (what `kubectl describe pod` lists under Events), else its
PodScheduled condition, else a waiting container's reason (ErrImageNeverPull, ImagePullBackOff, ...).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timezone

RUN_LABEL = "pipeline/runid"
NODE_NAME = "workflows.argoproj.io/node-name"  # Argo's name of the DAG node a pod runs (names the task)
DEFAULT_LIMIT = 600


class PendingWatch:
    """Call it once per poll: None while nothing has been Pending too long, else the one line saying which
    task, for how long and why. Without kubectl (or a cluster it can reach) it says so once and stays quiet."""

    def __init__(self, run_id: str, limit_s: float, context: str | None = None, kubectl: str = "kubectl",
                 warn=print):
        self.run_id, self.limit_s, self.warn = run_id, limit_s, warn
        self.base = [kubectl] + (["--context", context] if context else [])
        self.disabled = limit_s <= 0
        if not self.disabled and shutil.which(kubectl) is None:
            self._disable(f"{kubectl} is not on PATH")

    def _disable(self, why: str) -> None:
        self.disabled = True
        self.warn(f"note: not watching for Pending task pods ({why}); only the run's state is followed")

    def _kubectl(self, *args: str) -> dict | None:
        try:
            proc = subprocess.run([*self.base, *args, "-o", "json"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            self._disable(f"kubectl {args[0]} {args[1]} did not answer within 60 s")
            return None
        if proc.returncode != 0:
            self._disable(f"kubectl {args[0]} {args[1]}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
            return None
        return json.loads(proc.stdout)

    def __call__(self, now: datetime | None = None) -> str | None:
        if self.disabled:
            return None
        pods = self._kubectl("get", "pods", "--all-namespaces", "-l", f"{RUN_LABEL}={self.run_id}")
        now = now or datetime.now(timezone.utc)
        for pod in (pods or {}).get("items", []):
            meta, status = pod["metadata"], pod.get("status", {})
            age = (now - _time(meta["creationTimestamp"])).total_seconds()
            if status.get("phase") == "Pending" and age > self.limit_s:
                task = meta.get("annotations", {}).get(NODE_NAME, "").rsplit(".", 1)[-1] or meta["name"]
                return (f"task {task} (pod {meta['namespace']}/{meta['name']}) has been Pending for {age:.0f} s "
                        f"(limit {self.limit_s:g} s): {self._why(pod)}")
        return None

    def _why(self, pod: dict) -> str:
        meta = pod["metadata"]
        events = self._kubectl("get", "events", "-n", meta["namespace"], "--field-selector",
                               f"involvedObject.name={meta['name']},reason=FailedScheduling") or {}
        latest = max(events.get("items", []), default=None,
                     key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        if latest:
            return f"FailedScheduling: {latest.get('message', '').strip()}"
        for cond in pod.get("status", {}).get("conditions", []):
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '').strip()}"
        for cs in pod.get("status", {}).get("containerStatuses", []) + \
                pod.get("status", {}).get("initContainerStatuses", []):
            waiting = cs.get("state", {}).get("waiting")
            if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                return f"container {cs['name']}: {waiting['reason']}: {waiting.get('message', '').strip()}"
        return "no scheduler event or container reason yet (kubectl describe pod says more)"


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
