"""`sam-pipeline run` between its flags and the local runner (`pipelines/local.py`): the pipeline arguments
built from the flags and checked before any work starts, the demo/offline inputs filled in, and the summary
printed at the end. `pipelines/cli.py` keeps only argparse and the command's order of work.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from components.errors import UserError, first_line

EXIT_USAGE = 2


class RunArgsError(UserError):
    """A bad `run` flag, found before any work starts (the CLI exits 2)."""

    exit_code = EXIT_USAGE


def run_params(args) -> dict:
    """Pipeline arguments from `run`'s flags (no credentials: those travel as environment variables)."""
    from components.training.config import PIPELINE_SETTINGS

    return {
        **{name: getattr(args, name) for name in PIPELINE_SETTINGS}, "dataset_source": args.dataset_source,
        "dataset_format": args.dataset_format, "dataset_categories": args.dataset_categories or "",
        "dataset_name": args.dataset_name,
        "weights_url": args.weights_url, "weights_sha256": args.weights_sha256, "bucket": args.bucket,
        "prefix": args.prefix, "margin": args.margin, "model_name": args.model_name,
        "model_registry_url": args.model_registry_url, "verify_data": args.verify_data,
        "force_retrain": args.force_retrain, "allow_overlap": args.allow_overlap, "embed_shards": args.embed_shards,
    }


_RUN_FLAGS = {"dataset_name": "--dataset-name", "model_name": "--model-name"}


def run_flag(key: str) -> str:
    """How `run` spells a pipeline parameter's flag."""
    return _RUN_FLAGS.get(key, f"--{key}")


def fill_names(args) -> None:
    """The dataset and model names a run uses unless given: after its source (`--demo`: the synthetic
    dataset and `sam-demo`); Penn-Fudan keeps `sam-pennfudan`, the pipeline's own default."""
    from components.datasets.sources import name_from_source

    if args.dataset_name is None:
        args.dataset_name = ("synthetic-penn-fudan" if args.demo
                             else name_from_source(args.dataset_source, args.dataset_format))
    if args.model_name is None:
        args.model_name = ("sam-demo" if args.demo else "sam-pennfudan" if args.dataset_name == "penn-fudan"
                           else f"sam-{args.dataset_name}")


def validate_run_params(params: dict, flag=run_flag) -> None:
    """Every pipeline argument present in `params` checked before any work starts (a NaN would otherwise
    surface only after fetch, ingest and finetune, or crash KFP's protobuf serialisation; NaN is not even
    JSON). `run` checks all of them; `submit`/`schedule` the `-p` values they send (`flag`: how the caller
    names a parameter in its message). The rules live with their owners: TrainConfig.validate, the
    registry's and the dataset's name rules, the store's bucket rule."""
    import dataclasses
    import math

    from components.datasets.ingest import check_name as check_dataset_name
    from components.registry import check_name as check_model_name
    from components.storage import check_bucket
    from components.training.config import TrainConfig

    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RunArgsError(f"{flag(key)} {value}: must be a finite number")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        TrainConfig(**{k: v for k, v in params.items() if k in fields}).validate()
    except UserError as e:  # TrainConfig.validate's one-line report of every bad setting
        raise RunArgsError(first_line(e)) from None
    for key, check in (("dataset_name", check_dataset_name), ("model_name", lambda v: check_model_name("name", v)),
                       ("bucket", check_bucket)):
        try:
            if key in params:
                check(params[key])
        except UserError as e:
            raise RunArgsError(f"{flag(key)}: {first_line(e)}") from None


def check_writable(args) -> None:
    """Every folder a run writes to, proven writable before any work starts (otherwise an OSError traceback
    here or one raw line from a task): the working folder, the pipeline root and the weights cache. Nothing
    is created: a source found unreachable next must leave no trace."""
    from components.files import writable_dir
    from components.weights import writable_models_dir

    writable_dir(Path.cwd(), "a run keeps checkpoints/, data/ and runs/ in the working folder",
                 "run sam-pipeline from a writable folder", create=False)
    writable_models_dir(create=False)
    writable_dir(args.pipeline_root, "a run keeps its task outputs, logs, records and the local store there",
                 "--pipeline-root moves it", create=False)


def _cuda_or_cpu(device: str) -> str:
    """The local run's device: the pipeline's steps see a plain cpu rather than each warning on its own."""
    if not device.startswith("cuda"):
        return device
    from components.sam.device import resolve_device

    chosen = str(resolve_device(device, notice=False))
    if chosen == "cpu":
        print("sam-pipeline: no CUDA device here; running on cpu (pass -g cpu to silence this)", file=sys.stderr)
    return chosen if chosen == "cpu" else device


def prepare_inputs(args) -> None:
    """Fill in `--demo`'s synthetic dataset and random checkpoint, fail in one line when a source cannot be
    reached (before any task starts), and settle the device; `args` is updated in place."""
    from components.datasets.sources import cache_path
    from pipelines import local

    if args.demo:
        if args.model_type != "vit_t":
            raise RunArgsError("--demo builds a random vit_t checkpoint; drop -m/--model_type")
        assets = local.make_demo_assets(Path("runs/demo"), images=args.demo_images)
        args.dataset_source, args.weights_url, args.weights_sha256 = (
            assets["dataset_source"], assets["weights_url"], assets["weights_sha256"])
    if not cache_path(args.dataset_source).is_file():  # a dataset cached by an earlier run works offline
        local.check_reachable(args.dataset_source, "dataset")
    if args.weights_url:
        local.check_reachable(args.weights_url, "weights")
    else:
        url, cached = local.default_weights_url(args.model_type)
        if cached is None:
            local.check_reachable(url, f"{args.model_type} weights")
    args.device = _cuda_or_cpu(args.device)


def choose_run_id(args) -> str:
    """This run's id: a new one, or with --resume the last unfinished run's (pipelines/local_runs.py)."""
    from pipelines import local_runs

    pending = local_runs.unfinished(args.pipeline_root, args.checkpoint_name)
    if args.resume:
        if pending is None:
            raise RunArgsError(f"--resume: no killed or failed run of {args.checkpoint_name} in "
                               f"{args.pipeline_root / 'runs'}")
        print(f"sam-pipeline: resuming run {pending['run_id']} of {args.checkpoint_name}", file=sys.stderr)
        return pending["run_id"]
    if pending is not None:
        at = local_runs.stopped_at(args.checkpoint_name, pending["run_id"])
        if at is not None:
            print(f"sam-pipeline: a run of {args.checkpoint_name} stopped at iteration {at}; --resume continues "
                  "it (this run starts from zero)", file=sys.stderr)
    return local_runs.new_run_id()


@contextlib.contextmanager
def sigterm_unwinds():
    """Turn SIGTERM into KeyboardInterrupt while the run is in progress, so every `finally` runs (the embedded
    S3 server stops with it). SIGKILL runs nothing: the server's parent-death watch covers that."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here, leave them as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_line(args, run_id: str) -> str:
    """What an interrupted run ends with: where training stopped, and the command that continues it."""
    from components.training.config import TrainConfig
    from pipelines import local_runs

    at = local_runs.stopped_at(args.checkpoint_name, run_id)
    name = "" if args.checkpoint_name == TrainConfig.checkpoint_name else f" -c {args.checkpoint_name}"
    where = f" at iteration {at}" if at is not None else ""
    return (f"interrupted{where}; `sam-pipeline run --resume{name}` (with the same flags) continues this run"
            + (f" from checkpoints/{args.checkpoint_name}/latest.pt" if at is not None else ""))


def failure_line(summary: dict, summary_json: Path | None) -> str:
    """The one line a failed run ends with: the first failed task, its error, where the log is."""
    failed = [t for t, i in summary["tasks"].items() if i["state"] == "FAILED"] or ["an unknown task"]
    error = summary["tasks"].get(failed[0], {}).get("error")
    problems = summary["tasks"].get(failed[0], {}).get("problems", [])
    if error and len(problems) == 1:  # one problem stays on the line; more follow it (failure_problems)
        error = f"{error} {problems[0]}"
    return (f"pipeline failed at {', '.join(failed)}" + (f" ({error})" if error else "")
            + f"; full log in {summary['log']}" + (f"; summary in {summary_json}" if summary_json else ""))


def failure_problems(summary: dict) -> list[str]:
    """The problems the first failed task's error listed (a dataset's, each naming its file), or []."""
    failed = [i for i in summary["tasks"].values() if i["state"] == "FAILED"]
    problems = failed[0].get("problems", []) if failed else []
    return problems if len(problems) > 1 else []  # a single one is on failure_line's line


def print_summary(summary: dict, *, margin: float, model_name: str, summary_json: Path | None, out=None) -> None:
    """What a person reads at the end of a run: task states and times, the verdict, where things are."""
    from components.eval_metrics import FINETUNED_BOX_DICE, verdict_lines

    out = out or sys.stdout
    print("\n== sam-pipeline run ==", file=out)
    for name, info in summary["tasks"].items():
        secs = f" {info['seconds']:.1f}s" if "seconds" in info else ""
        print(f"  {name:<15} {info['state']}{secs}", file=out)
    evaluated = FINETUNED_BOX_DICE in summary.get("metrics", {})
    if evaluated:
        # The run's own margin and verdict stand in for an evaluation that did not record them.
        for line in verdict_lines({"margin": margin, "passed": summary.get("passed"), **summary["metrics"]}):
            print(f"  {line}", file=out)
    for name, path in summary.get("checkpoints", {}).items():
        print(f"  checkpoint {name}: {path}", file=out)
    for task, path in summary.get("reports", {}).items():
        print(f"  {task} report: {path}", file=out)
    if summary.get("registered"):
        r = summary["registered"]
        print(f"  registered {model_name} {r['version']}: {r['model_uri']}", file=out)
    elif summary.get("skipped"):
        print(f"  skipped: {summary['skipped']} (--force retrains anyway)", file=out)
    elif summary["tasks"]["register-model"]["state"] == "SKIPPED":
        # The verdict above already says why: the reason is said once.
        print("  register-model skipped" + ("" if evaluated else f": {summary['tasks']['register-model']['reason']}"),
              file=out)
    for warning in summary.get("warnings", []):
        if not (evaluated and summary["metrics"].get("splits_overlap")):  # the verdict names the overlap
            print(f"  WARNING: {warning}", file=out)
    print(f"  full log: {summary['log']}", file=out)
    if summary_json:
        print(f"  summary: {summary_json}", file=out)
