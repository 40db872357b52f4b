"""`sam-pipeline run`: the whole pipeline on this machine through kfp.local.

The SubprocessRunner (use_venv=False) runs each component's own source with this interpreter, in this
working directory, with this process's environment: the S3 credentials of the run's store are set as
environment variables here (never as pipeline parameters) and the subprocesses inherit them. kfp-kubernetes
settings (GPU, secrets, node selector) are ignored locally.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from components.errors import UserError
from pipelines.sam_finetune import PIPELINE_NAME, Placement, build_pipeline

TASKS = ("fetch-weights", "ingest-dataset", "finetune", "evaluate", "register-model")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RunError(UserError, RuntimeError):
    """A one-line failure of a local run."""


# -- reachability ---------------------------------------------------------------------------------

def check_reachable(url: str, what: str, timeout: float = 5.0) -> None:
    """Fail in one line, before any task starts, when an http(s) source cannot be reached."""
    if not url.startswith(("http://", "https://")):
        return
    offline = ("no internet here? Use local files (--dataset-source PATH/zip/folder, --weights-url PATH "
               "--weights-sha256 HEX) or `sam-pipeline run --demo` (synthetic data, random vit_t)")
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "sam-pipeline"})
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise RunError(f"{what} {url} does not exist (HTTP {e.code})") from None
        # Some servers refuse HEAD (403/405) but serve GET: reachable is all we check here.
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RunError(f"cannot reach {what} {url} ({reason}); {offline}") from None


def default_weights_url(model_type: str) -> tuple[str, str | None]:
    """(catalogue URL, cached local file or None) for a model type."""
    from components import weights

    ckpt = weights.CATALOGUE[model_type]
    cached = weights.models_dir() / ckpt.filename
    return ckpt.url, str(cached) if cached.is_file() else None


# -- demo assets ------------------------------------------------------------------------------------

def make_demo_assets(work_dir: Path, *, images: int = 12, size_range=(96, 160), seed: int = 0) -> dict:
    """A small synthetic Penn-Fudan zip and a randomly initialised vit_t checkpoint, for offline runs."""
    import torch

    from components.datasets.synthetic import make_pennfudan_zip
    from components.hashing import sha256_file
    from components.sam.model import atomic_torch_save, build_sam

    work_dir.mkdir(parents=True, exist_ok=True)
    n_fudan = images // 2
    zip_path = work_dir / f"PennFudanPed-synthetic-{images}-{size_range[0]}-{size_range[1]}-s{seed}.zip"
    if not zip_path.is_file():
        make_pennfudan_zip(zip_path, n_fudan=n_fudan, n_penn=images - n_fudan, seed=seed, size_range=size_range)
    ckpt = work_dir / f"vit_t_random_s{seed}.pth"
    if not ckpt.is_file():
        torch.manual_seed(seed)
        atomic_torch_save(build_sam("vit_t").state_dict(), ckpt)
    return {"dataset_source": str(zip_path), "weights_url": str(ckpt), "weights_sha256": sha256_file(ckpt),
            "model_type": "vit_t"}


# -- running ----------------------------------------------------------------------------------------

def _fix_kfp_local_conditions() -> None:
    """kfp.local 2.17.3 reads a condition's `pipelinechannel--<task>-<output>` as a *parent input* unless
    the output is named `Output`, so `dsl.If(evaluate.outputs["passed"] == True)` always skips locally
    (the cluster's driver resolves it correctly). Resolve it as the task output it is, then fall back to
    kfp's own lookup. In-process only: the compiled pipeline is untouched."""
    from kfp.local.orchestrator import enhanced_dag_orchestrator as dag

    original = dag.ConditionEvaluator._resolve_pipeline_channel
    if getattr(original, "_sam_pipeline_fix", False):
        return

    def resolve(channel_ref, io_store):
        ref = channel_ref.replace("pipelinechannel--", "", 1)
        if "--" not in ref and "-Output" not in ref:
            parts = ref.split("-")
            for i in range(len(parts) - 1, 0, -1):
                try:
                    return io_store.get_task_output("-".join(parts[:i]), "-".join(parts[i:]))
                except (ValueError, KeyError):
                    continue
        return original(channel_ref, io_store)

    resolve._sam_pipeline_fix = True
    dag.ConditionEvaluator._resolve_pipeline_channel = staticmethod(resolve)


class _TaskEvents(logging.Filter):
    """kfp.local reports task starts, ends and skips through the root logger (whose handlers it swaps):
    a logger-level filter sees every record and times each task."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[float, str]] = []

    def filter(self, record):
        self.events.append((record.created, _ANSI.sub("", str(record.getMessage()))))
        return True

    def tasks(self) -> dict:
        out: dict[str, dict] = {}
        for t, msg in self.events:
            if m := re.match(r"Executing task '?([\w-]+)'?", msg):
                out.setdefault(m.group(1), {}).update(state="RUNNING", started=t)
            elif m := re.match(r"Task '?([\w-]+)'? finished with status (\w+)", msg):
                info = out.setdefault(m.group(1), {})
                info["state"] = "SUCCEEDED" if m.group(2) == "SUCCESS" else "FAILED"
                if "started" in info:
                    info["seconds"] = round(t - info["started"], 2)
            elif m := re.match(r"Skipping (?:conditional )?task '?([\w-]+)'?(.*)", msg):
                out.setdefault(m.group(1), {}).update(state="SKIPPED", reason=m.group(2).strip(" :()") or None)
        for info in out.values():
            info.pop("started", None)
        # A false dsl.If skips its sub-DAG ("condition-N"), not the tasks inside it.
        for name, info in list(out.items()):
            if name.startswith("condition-") and info.get("state") == "SKIPPED":
                out.setdefault("register-model", {"state": "SKIPPED", "reason": "evaluate.passed is false"})
        return out


def _read_outputs(task_dir: Path) -> dict:
    path = task_dir / "executor_output.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    out = {"parameters": raw.get("parameterValues", {}), "artifacts": {}}
    for name, group in (raw.get("artifacts") or {}).items():
        art = (group.get("artifacts") or [{}])[0]
        uri = art.get("uri", "")
        out["artifacts"][name] = {"uri": uri, "path": uri.replace("file://", "", 1) if uri else None,
                                  "metadata": art.get("metadata", {})}
    return out


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def object_store(endpoint: str | None):
    """The run's store: the given endpoint (credentials from the environment) or an embedded one."""
    from components.storage import S3Config

    if endpoint:
        yield S3Config.from_env(endpoint=endpoint), False
        return
    from components.s3server import embedded_s3

    with embedded_s3() as cfg:
        yield cfg, True


def run_local(params: dict, *, pipeline_root: Path, s3_endpoint: str | None = None, retries: int = 0) -> dict:
    """Run the pipeline with kfp.local; returns the summary (task states, metrics, uris). Never raises for a
    failed task: the summary says which one failed."""
    from kfp import local

    from components.storage import ObjectStore

    pipeline_root = pipeline_root.resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with object_store(s3_endpoint) as (cfg, embedded):
        params = {**params, "s3_endpoint": cfg.endpoint, "bucket": params.get("bucket") or cfg.bucket,
                  "prefix": params.get("prefix") or cfg.prefix}
        env = {"AWS_ACCESS_KEY_ID": cfg.access_key, "AWS_SECRET_ACCESS_KEY": cfg.secret_key,
               "AWS_REGION": cfg.region or os.environ.get("AWS_REGION"),
               "S3_SECURE": "true" if cfg.secure else None}
        # A local retry re-runs at once: the cluster's 60 s backoff would only make a failing run slow.
        pipeline = build_pipeline(dataclasses.replace(Placement(), finetune_retries=retries, retry_backoff="0s"))
        before = {p.name for p in pipeline_root.glob(f"{PIPELINE_NAME}-*")}
        events = _TaskEvents()
        root = logging.getLogger()
        root.addFilter(events)
        level = root.level
        # kfp.local logs skips with logging.info outside its own logger context; let them reach the filter
        # (with no handler of ours attached, nothing extra is printed).
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        try:
            with _environ(env), warnings.catch_warnings():
                # Expected locally: our images are not "python" images, and GPU/resource settings only
                # apply in a cluster. The same code runs in both places; the noise would hide real warnings.
                warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
                warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
                _fix_kfp_local_conditions()
                local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                           raise_on_error=False)
                pipeline(**params)
        finally:
            root.removeFilter(events)
            root.setLevel(level)
        new = sorted(p for p in pipeline_root.glob(f"{PIPELINE_NAME}-*") if p.name not in before)
        run_dir = new[-1] if new else None
        tasks = events.tasks()
        for name in TASKS:
            info = tasks.setdefault(name, {"state": "NOT_RUN"})
            if run_dir is not None:
                info.update(_read_outputs(run_dir / name))
        summary = {
            "pipeline": PIPELINE_NAME,
            "succeeded": all(tasks[t]["state"] in ("SUCCEEDED", "SKIPPED") for t in TASKS)
            and tasks["evaluate"]["state"] == "SUCCEEDED",
            "seconds": round(time.time() - started, 1),
            "run_dir": str(run_dir) if run_dir else None,
            "parameters": {k: v for k, v in params.items()},
            "object_store": {"endpoint": cfg.endpoint, "bucket": cfg.bucket, "prefix": params["prefix"],
                             "embedded": embedded},
            "tasks": tasks,
        }
        summary.update(_digest(summary))
        # KFP names an HTML artifact after its output ("report"); a .html copy opens in a browser.
        for task, path in list(summary["reports"].items()):
            if run_dir is not None and Path(path).is_file():
                copy = run_dir / f"{task}-report.html"
                shutil.copyfile(path, copy)
                summary["reports"][task] = str(copy)
        if embedded and tasks["finetune"]["state"] == "SUCCEEDED":
            # The embedded store disappears with the run: keep what the user asked for on local disk.
            summary["registered_copy"] = _keep_registered(ObjectStore(
                dataclasses.replace(cfg, prefix=params["prefix"]), create_bucket=False), summary,
                pipeline_root / "registry")
    return summary


def _digest(summary: dict) -> dict:
    """The numbers and places a person looks for first."""
    t = summary["tasks"]
    meta = lambda task, art: t[task].get("artifacts", {}).get(art, {})  # noqa: E731
    evaluation = t["evaluate"].get("parameters", {}).get("metrics_json")
    metrics = {**meta("finetune", "metrics").get("metadata", {}), **meta("evaluate", "metrics").get("metadata", {}),
               **(json.loads(evaluation) if evaluation else {})}
    reg = t["register-model"].get("parameters", {})
    return {
        "metrics": metrics,
        "passed": t["evaluate"].get("parameters", {}).get("passed"),
        "reports": {task: meta(task, "report").get("path") for task in ("finetune", "evaluate")
                    if meta(task, "report").get("path")},
        "model": meta("finetune", "model").get("path"),
        "model_metadata": {k: v for k, v in meta("finetune", "model").get("metadata", {}).items() if k != "history"},
        "dataset": meta("ingest-dataset", "dataset").get("metadata", {}),
        "weights": meta("fetch-weights", "weights").get("metadata", {}),
        "registered": {"version": reg.get("version"), "model_uri": reg.get("model_uri")} if reg else None,
    }


def _keep_registered(store, summary: dict, dest_root: Path) -> dict | None:
    reg = summary.get("registered")
    if not reg or not reg.get("model_uri"):
        return None
    _, key = store.parse_uri(reg["model_uri"])
    folder = dest_root / Path(key).parent.relative_to(store.config.prefix)
    store.get_file(key, folder / "model.pt")
    card_key = key.rsplit("/", 1)[0] + "/model_card.json"
    store.get_file(card_key, folder / "model_card.json")
    return {"model": str(folder / "model.pt"), "card": str(folder / "model_card.json")}


def find_checkpoints(checkpoint_name: str, root: Path = Path("checkpoints")) -> dict:
    """best.pt/latest.pt as the seed left them: the finetune subprocess runs in this working directory
    (kfp.local's SubprocessRunner does not change it), so `checkpoints/<name>/` lands here."""
    folder = root / checkpoint_name
    return {name: str(folder / f"{name}.pt") for name in ("best", "latest") if (folder / f"{name}.pt").is_file()}


def remove_old_runs(pipeline_root: Path, keep: int = 5) -> None:
    """kfp.local keeps every run's artifacts (checkpoints included); keep only the most recent ones."""
    runs = sorted(pipeline_root.glob(f"{PIPELINE_NAME}-*"))
    for old in runs[:-keep] if keep else runs:
        shutil.rmtree(old, ignore_errors=True)
