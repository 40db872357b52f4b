"""`sam-pipeline run`: the whole pipeline on this machine through kfp.local.

The SubprocessRunner (use_venv=False) runs each component's own source with this interpreter, in this
working directory, with this process's environment: the S3 credentials of the run's store are set as
environment variables here (never as pipeline parameters) and the subprocesses inherit them. kfp-kubernetes
settings (GPU, secrets, node selector) are ignored locally.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from components.errors import UserError
from components.kfp_components import TASKS  # in topological order
from pipelines.local_console import Console, Events
from pipelines.local_tasks import gate_verdicts, task_graph, task_states
from pipelines.sam_finetune import PIPELINE_NAME, Placement, build_pipeline


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
    """A small synthetic Penn-Fudan zip and a randomly initialised vit_t checkpoint, for offline runs (made
    once: a later demo run only hashes them, without importing torch)."""
    from components.datasets.synthetic import make_pennfudan_zip
    from components.hashing import sha256_file

    work_dir.mkdir(parents=True, exist_ok=True)
    n_fudan = images // 2
    zip_path = work_dir / f"PennFudanPed-synthetic-{images}-{size_range[0]}-{size_range[1]}-s{seed}.zip"
    if not zip_path.is_file():
        make_pennfudan_zip(zip_path, n_fudan=n_fudan, n_penn=images - n_fudan, seed=seed, size_range=size_range)
    ckpt = work_dir / f"vit_t_random_s{seed}.pth"
    if not ckpt.is_file():
        import torch

        from components.sam.model import atomic_torch_save, build_sam

        torch.manual_seed(seed)
        atomic_torch_save(build_sam("vit_t").state_dict(), ckpt)
    return {"dataset_source": str(zip_path), "weights_url": str(ckpt), "weights_sha256": sha256_file(ckpt),
            "model_type": "vit_t"}


# -- running ----------------------------------------------------------------------------------------

def _fix_kfp_local_conditions() -> None:
    """kfp.local 2.17.3 reads a condition's `pipelinechannel--<task>-<output>` as a *parent input* unless
    the output is named `Output`, so `dsl.If(evaluate.outputs["passed"] == True)` always skips locally
    (the cluster's driver resolves it correctly). Resolve it as the task output it is, then fall back to
    kfp's own lookup. In-process only: the compiled pipeline is untouched.

    Upstream: kubeflow/pipelines sdk/python/kfp/local/orchestrator/enhanced_dag_orchestrator.py,
    `ConditionEvaluator._resolve_pipeline_channel`; fixed by the open PR kubeflow/pipelines#13313 ("fix
    dsl.Condition", a CEL evaluator in kfp/local/orchestrator/cel.py). tests/test_local_run.py fails once the
    installed kfp resolves task outputs itself: then this patch goes."""
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
    resolve._original = original
    dag.ConditionEvaluator._resolve_pipeline_channel = staticmethod(resolve)


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
def object_store(endpoint: str | None, pipeline_root: Path, bucket: str, prefix: str, fresh: bool = False):
    """The run's store: the given endpoint (credentials from the environment) or the S3 server this working
    folder's runs share, which keeps what they store (pipelines/local_store.py); `fresh` empties that first."""
    from components.storage import S3Config
    from pipelines.local_store import shared_store

    if endpoint:
        yield S3Config.from_env(endpoint=endpoint), False
        return
    with shared_store(pipeline_root, bucket=bucket, prefix=prefix, fresh=fresh) as cfg:
        yield cfg, True


def run_local(params: dict, *, pipeline_root: Path, s3_endpoint: str | None = None, retries: int = 0,
              verbose: bool = False, fresh: bool = False, out=None) -> dict:
    """Run the pipeline with kfp.local; returns the summary (task states, metrics, uris). Never raises for a
    failed task: the summary says which one failed. The console shows task starts and finishes and a progress
    line; the whole stream goes to the log file named in the summary (`verbose`: to the console too).

    The run's outputs go to a folder of its own, `<pipeline_root>/run-<time>-<pid>/` (kfp.local's pipeline root
    for this run alone), so runs started at once in one folder never read each other's task states."""
    from pipelines.local_tmp import scratch

    out = out or sys.stdout
    pipeline_root = pipeline_root.resolve()
    stem = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    own = pipeline_root / stem
    log_path = pipeline_root / "logs" / f"{stem}.log"
    for folder in (own, log_path.parent):
        folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bucket, prefix = params.get("bucket") or "mlpipeline", params.get("prefix") or "sam-pipeline/"
    with object_store(s3_endpoint, pipeline_root, bucket, prefix, fresh) as (cfg, embedded), \
            open(log_path, "w") as log, scratch() as tmp:
        params = {**params, "s3_endpoint": cfg.endpoint, "bucket": params.get("bucket") or cfg.bucket,
                  "prefix": params.get("prefix") or cfg.prefix}
        # A local retry re-runs at once: the cluster's 60 s backoff would only make a failing run slow.
        pipeline = build_pipeline(dataclasses.replace(Placement(), finetune_retries=retries, retry_backoff="0s"))
        env = {"AWS_ACCESS_KEY_ID": cfg.access_key, "AWS_SECRET_ACCESS_KEY": cfg.secret_key,
               "AWS_REGION": cfg.region or os.environ.get("AWS_REGION"),
               "S3_SECURE": "true" if cfg.secure else None,
               # the tasks' temporary files (kfp's ephemeral_component.py folders too) go where the run cleans up
               "TMPDIR": str(tmp / "tmp")}
        console = Console(out, log, verbose=verbose)
        print(f"sam-pipeline: full log in {log_path}", file=out, flush=True)
        events = _execute(pipeline, params, own, tmp / "workspace", env, console)
        run_dir = next(iter(sorted(own.glob(f"{PIPELINE_NAME}-*"))), None)
        summary = _summarise(pipeline, run_dir, events, console, params, cfg, embedded)
        summary.update(seconds=round(time.time() - started, 1), log=str(log_path))
    return summary


def _execute(pipeline, params: dict, own: Path, workspace: Path, env: dict, console: Console) -> Events:
    """Run the pipeline through kfp.local into `own`, its records going to the console; returns the events."""
    from kfp import local

    events = Events(console)
    root = logging.getLogger()
    handlers = root.handlers[:]
    printer = builtins.print
    root.addFilter(events)
    # kfp.local's own handler exists only while a task runs; between tasks its records (skips, clean-up)
    # go to the log file through this one, and logging's implicit basicConfig cannot print them here.
    to_log = logging.StreamHandler(console.log)
    root.addHandler(to_log)
    level = root.level
    # kfp.local logs skips with logging.info outside its own logger context; let them reach the filter
    # (with no handler of ours attached, nothing extra is printed).
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    workspace.mkdir(parents=True, exist_ok=True)
    try:
        with _environ(env), warnings.catch_warnings(), contextlib.redirect_stdout(console):
            # Expected locally: our images are not "python" images, and GPU/resource settings only
            # apply in a cluster. The same code runs in both places; the noise would hide real warnings.
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
            warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
            _fix_kfp_local_conditions()
            # Our own workspace: kfp.local's default is a kfp-workspace-* in the system temp folder, left
            # behind when the run is killed.
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(own),
                       workspace_root=str(workspace), raise_on_error=False)
            pipeline(**params)
    finally:
        root.removeFilter(events)
        # The root logger's handlers as they were. kfp.local swaps them around each task and puts back what it
        # saw (kfp/local/logging_utils.py, `local_logger_context`); a dsl.ParallelFor runs its tasks in threads,
        # so one task can save another's handler and restore it for good: a handler writing to this run's
        # console, whose log file closes when the run ends (the next run in this process then printed
        # "--- Logging error ---").
        root.handlers[:] = handlers
        root.setLevel(level)
        # The same race with print: kfp.local indents it around each task by swapping builtins.print
        # (logging_utils.py, `indented_print`), and a thread of the fan-out can restore another's indenting print
        # for good: every later print in this process began with four spaces.
        builtins.print = printer
        console.write("\n")
    return events


def _summarise(pipeline, run_dir: Path | None, events: Events, console: Console, params: dict, cfg,
               embedded: bool) -> dict:
    """The summary of the run whose task folders are in `run_dir`."""
    tasks = task_states(task_graph(pipeline), run_dir, gates=gate_verdicts(run_dir))
    for name, seconds in events.seconds().items():
        if name in tasks:
            tasks[name]["seconds"] = seconds
    for name, info in tasks.items():
        if info["state"] == "FAILED":
            info["error"] = console.error_line(name)
            if problems := console.problem_lines(name):
                info["problems"] = problems
    summary = {
        "pipeline": PIPELINE_NAME,
        "succeeded": all(tasks[t]["state"] in ("SUCCEEDED", "SKIPPED") for t in TASKS),
        "run_dir": str(run_dir) if run_dir else None,
        "parameters": dict(params),
        "object_store": {"endpoint": cfg.endpoint, "bucket": cfg.bucket, "prefix": params["prefix"],
                         "embedded": embedded},
        "tasks": tasks,
    }
    summary.update(_digest(summary))
    if tasks["check-changes"].get("parameters", {}).get("changed") is False:
        summary["skipped"] = tasks["check-changes"]["parameters"].get("reason")
    if summary["dataset"].get("splits_overlap"):
        summary["warnings"] = [f"the splits of {summary['dataset'].get('dataset')} overlap: images serve more "
                               "than one of train/val/test, so the evaluation scores images the model was "
                               "trained on" + ("" if params.get("allow_overlap")
                                               else "; registration refused (--allow-overlap registers anyway)")]
    # KFP names an HTML artifact after its output ("report"); a .html copy opens in a browser.
    for task, path in list(summary["reports"].items()):
        if run_dir is not None and Path(path).is_file():
            copy = run_dir / f"{task}-report.html"
            shutil.copyfile(path, copy)
            summary["reports"][task] = str(copy)
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


def find_checkpoints(checkpoint_name: str, root: Path = Path("checkpoints")) -> dict:
    """best.pt/latest.pt as the seed left them: the finetune subprocess runs in this working directory
    (kfp.local's SubprocessRunner does not change it), so `checkpoints/<name>/` lands here."""
    folder = root / checkpoint_name
    return {name: str(folder / f"{name}.pt") for name in ("best", "latest") if (folder / f"{name}.pt").is_file()}


def remove_old_runs(pipeline_root: Path, keep: int = 5) -> None:
    """kfp.local keeps every run's artifacts (checkpoints included); keep only the most recent runs' folders
    (`run-<time>-<pid>`, and `sam-finetune-*` of older versions), and as many run logs. A folder whose run is
    still going (another run in this folder) is never removed. The store (`store/`) is never pruned."""
    from components.files import pid_alive

    def running(folder: Path) -> bool:
        pid = folder.name.rsplit("-", 1)[-1]
        return folder.name.startswith("run-") and pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid))

    runs = sorted((p for p in pipeline_root.glob("*")
                   if p.is_dir() and p.name.startswith(("run-", f"{PIPELINE_NAME}-"))), key=lambda p: p.stat().st_mtime)
    for old in runs[:-keep] if keep else runs:
        if not running(old):
            shutil.rmtree(old, ignore_errors=True)
    logs = sorted((pipeline_root / "logs").glob("run-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-keep] if keep else logs:
        old.unlink(missing_ok=True)
