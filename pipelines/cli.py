"""`sam-pipeline`: compile | run | submit | schedule | upload | fetch-weights | ingest | predict.

A user-facing error (`components.errors.UserError`) ends the command with one line `sam-pipeline: error: ...`
(or one line per problem) and a non-zero exit; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from components.errors import UserError, first_line
from components.weights import MODEL_TYPES
from pipelines import compile_flags, pending
from pipelines.cli_types import (HelpFormatter, _add_seed_flags, _add_store_flags, _int_at_least, _key_value, _usage,
                                 package_version)
from pipelines.run_args import EXIT_USAGE

EXIT_FAILURE = 1


class CLIError(UserError):
    """A bad command line or a failed command, with the exit code to end on."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = code


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # Every parser, subcommands' too, and those asking for RawDescriptionHelpFormatter (predict's epilog):
        # HelpFormatter keeps descriptions and epilogs as written and adds each flag's default.
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line instead of usage + error
        raise CLIError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


# -- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from pipelines.sam_finetune import DEFAULT_YAML

    parser = _Parser(prog="sam-pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compile", help="write the pipeline YAML (committed as pipelines/sam_finetune.yaml)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_YAML, help="where the YAML goes")
    compile_flags.add_flags(p, retries_type=_int_at_least(0), key_value_type=_key_value)
    p.set_defaults(func=cmd_compile)

    _add_run(sub)
    _add_cluster_commands(sub)
    _add_step_commands(sub)
    return parser


def _add_run(sub) -> None:
    """`run`: the seed's flags, data and evaluation, the store, where outputs go."""
    from components.datasets.adapters import FORMATS
    from pipelines.sam_finetune import PENN_FUDAN_URL

    p = sub.add_parser("run", help="run the whole pipeline here (kfp.local + an S3 server on 127.0.0.1)")
    _add_seed_flags(p)
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--dataset-source", default=PENN_FUDAN_URL, help="URL, zip, folder or s3:// uri")
    g.add_argument("--dataset-format", default="auto", choices=FORMATS,
                   help="folder: images/<stem>.png + masks/<stem>.png; auto tells them apart")
    g.add_argument("--dataset-categories", default="", help="COCO: keep only these categories (comma-separated)")
    g.add_argument("--dataset-name", default=None,
                   help="name in the store (default: after the source: penn-fudan for Penn-Fudan, else the "
                        "folder's or zip's name)")
    g.add_argument("--weights-url", default="", help="checkpoint URL or local file (default: the catalogue)")
    g.add_argument("--weights-sha256", default="", help="expected sha256 of --weights-url")
    g.add_argument("--margin", type=float, default=0.0,
                   help="register only if fine-tuned box Dice > zero-shot (and champion) + margin")
    g.add_argument("--model-name", default=None,
                   help="registered model name (default: sam-<dataset name>; sam-pennfudan for Penn-Fudan)")
    g.add_argument("--model-registry-url", default="", help="also register in Kubeflow Model Registry")
    g.add_argument("--verify-data", action="store_true",
                   help="re-check every stored object of the dataset against its sha256 and repair what is wrong")
    g.add_argument("--force", "--force-retrain", dest="force_retrain", action="store_true",
                   help="train even when data, weights and settings equal the registered champion's")
    g.add_argument("--allow-overlap", action="store_true",
                   help="register even when the splits overlap (a dataset under 3 images)")
    g.add_argument("--resume", action="store_true",
                   help="continue the last killed or failed run of this checkpoint name from its latest.pt")
    g.add_argument("--demo", action="store_true",
                   help="offline: a synthetic Penn-Fudan-like dataset and a random vit_t checkpoint")
    g.add_argument("--demo-images", type=_int_at_least(6), default=12, help="images of --demo's dataset")
    g.add_argument("--embed-shards", type=_int_at_least(1), default=1, help="embed tasks before finetune")
    _add_store_flags(p, local_default=True)
    g = p.add_argument_group("output")
    g.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"),
                   help="where kfp.local keeps task outputs")
    g.add_argument("--summary-json", type=Path, help="write a machine-readable summary here")
    g.add_argument("--retries", type=_int_at_least(0), default=0, help="finetune retries (resume from latest.pt)")
    g.add_argument("--keep-runs", type=_int_at_least(1), default=5, help="older local runs are deleted")
    g.add_argument("--fresh", action="store_true",
                   help="start from an empty local store: first removes --pipeline-root's store/objects/, every "
                        "dataset, embedding, checkpoint and registered version earlier runs kept there (not "
                        "checkpoints/ or the run folders); refused while another run of the folder is running")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="stream every task's whole log here (default: task lines and progress; the log goes "
                        "to a file under --pipeline-root)")
    p.set_defaults(func=cmd_run)



def _add_cluster_commands(sub) -> None:
    """`submit`, `schedule` and `upload`: a KFP cluster's commands."""
    from pipelines.sam_finetune import DEFAULT_YAML

    for name, helptext in (("submit", "create a run on a KFP cluster (compiled package or uploaded version)"),
                           ("schedule", "create a recurring run (max concurrency 1, no catch-up)"),
                           ("upload", "upload the compiled package as a new pipeline version (KFP UI: Pipelines)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
        p.add_argument("--package", type=Path, default=DEFAULT_YAML, help="compiled pipeline YAML")
        p.add_argument("--namespace", default=None, help="multi-user deployments")
        # Read at connect time, not as the default: --help must never print a secret.
        p.add_argument("--token", default=None, help="bearer token (default: KFP_TOKEN)")
        if name == "upload":
            p.add_argument("--pipeline", default="sam-finetune", help="pipeline name in the UI")
            p.add_argument("--version", default=None,
                           help="version name (default: <package version>-<git commit>[-dirty])")
            p.add_argument("--description", default="Fine-tune MobileSAM and register it if it beats the champion",
                           help="the version's description in the UI")
            p.set_defaults(func=cmd_upload)
            continue
        p.add_argument("--pipeline", default=None, metavar="NAME",
                       help="run an uploaded pipeline instead of --package")
        p.add_argument("--pipeline-version", default=None, metavar="V",
                       help="with --pipeline: this version (default: the newest)")
        p.add_argument("--experiment", default="sam-pipeline", help="KFP experiment the run goes to")
        p.add_argument("-p", "--param", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                       help="pipeline parameter (repeatable)")
        if name == "submit":
            p.add_argument("--run-name", default=None, help="default: sam-finetune <dataset> <UTC time>")
            p.add_argument("--wait", action="store_true",
                           help="wait until the run ends; exit 0 only if it SUCCEEDED")
            p.add_argument("--timeout", type=_int_at_least(1), default=6 * 3600, help="seconds, with --wait")
            p.add_argument("--pending-limit", type=_int_at_least(0), default=pending.DEFAULT_LIMIT, metavar="SECONDS",
                           help="with --wait: stop waiting when a task pod is Pending this long, saying why "
                                "(kubectl, context --kube-context); 0: never")
            p.add_argument("--kube-context", default=os.environ.get("KUBE_CONTEXT"),
                           help="kubectl context of the run's cluster (default KUBE_CONTEXT, else kubectl's)")
            p.set_defaults(func=cmd_submit)
        else:
            when = p.add_mutually_exclusive_group(required=True)
            when.add_argument("--cron", type=_usage("validate_cron"),
                              help="6 fields: second minute hour day-of-month month day-of-week")
            when.add_argument("--every", type=_usage("parse_interval"), help="interval, e.g. 24h")
            p.add_argument("--name", default="sam-finetune-scheduled", help="the recurring run's name")
            p.add_argument("--replace", action="store_true",
                           help="replace a recurring run of the same name in the experiment (default: refuse)")
            p.set_defaults(func=cmd_schedule)



def _add_step_commands(sub) -> None:
    """`fetch-weights` and `ingest`: one step alone; `predict` (pipelines/cli_predict.py)."""
    from components.datasets.adapters import FORMATS
    from pipelines import cli_predict
    from components.training.config import TrainConfig
    from pipelines.sam_finetune import PENN_FUDAN_URL

    p = sub.add_parser("fetch-weights", help="run the fetch-weights step alone; prints a JSON summary")
    p.add_argument("-m", "--model-type", "--model_type", dest="model_type",
                   default=TrainConfig.model_type, choices=MODEL_TYPES, help="which checkpoint of the catalogue")
    p.add_argument("--url", default=None, help="a mirror URL or a local file (default: the catalogue's URL)")
    p.add_argument("--sha256", default=None, help="expected sha256 of --url (default: the catalogue's)")
    _add_store_flags(p, local_default=False)
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("ingest", help="run the ingest-dataset step alone; prints a JSON summary")
    p.add_argument("--source", default=PENN_FUDAN_URL, help="URL, zip, folder or s3:// uri")
    p.add_argument("--format", "--dataset-format", dest="dataset_format", default="auto", choices=FORMATS,
                   help="folder: images/<stem>.png + masks/<stem>.png; auto tells them apart")
    p.add_argument("--categories", help="COCO: keep only these categories (comma-separated names)")
    p.add_argument("--keep-empty", action="store_true", help="COCO: keep images without an instance")
    p.add_argument("--name", dest="dataset_name", default=None,
                   help="name in the store (default: after the source, as `run` names it)")
    p.add_argument("--split-seed", type=int, default=0, help="seeds the train/val/test split")
    p.add_argument("--verify", action="store_true",
                   help="download and hash every object of an already ingested version and re-upload "
                        "what is missing or damaged (a plain re-run trusts the committed manifest)")
    _add_store_flags(p, local_default=False)
    p.set_defaults(func=cmd_ingest)
    cli_predict.add_parser(sub, _add_store_flags)


# -- commands -------------------------------------------------------------------------------------

def cmd_compile(args) -> int:
    from pipelines.sam_finetune import compile_pipeline

    path = compile_pipeline(args.output, compile_flags.placement(args))
    print(f"wrote {path}")
    return 0


def cmd_run(args) -> int:
    from pipelines import local, local_runs, run_args

    run_args.fill_names(args)
    run_args.validate_run_params(run_args.run_params(args))
    run_args.check_writable(args)
    if args.fresh and args.s3_endpoint:
        raise run_args.RunArgsError("--fresh empties the local store; with --s3-endpoint there is none")
    run_args.prepare_inputs(args)
    run_id = run_args.choose_run_id(args)
    try:
        with local_runs.recorded(args.pipeline_root, run_id, args.checkpoint_name) as outcome, \
                run_args.sigterm_unwinds():  # a SIGTERM stops the run's S3 server and tasks like Ctrl-C does
            summary = local.run_local({**run_args.run_params(args), "resume_run_id": run_id},
                                      pipeline_root=args.pipeline_root, s3_endpoint=args.s3_endpoint,
                                      retries=args.retries, verbose=args.verbose, fresh=args.fresh)
            outcome["state"] = local_runs.SUCCEEDED if summary["succeeded"] else local_runs.FAILED
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the record says failed, so --resume finds this run
        raise CLIError(run_args.interrupted_line(args, run_id), 130) from None
    summary["checkpoints"] = local.find_checkpoints(args.checkpoint_name)
    local.remove_old_runs(args.pipeline_root, keep=args.keep_runs)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    run_args.print_summary(summary, margin=args.margin, model_name=args.model_name, summary_json=args.summary_json)
    if not summary["succeeded"]:
        error = CLIError(run_args.failure_line(summary, args.summary_json))
        error.problems = run_args.failure_problems(summary)  # a dataset's problems, as `ingest` prints them
        raise error
    return 0


def _connect(args):
    from pipelines import kfp_client

    # A bad --host is a UsageError (exit 2).
    return kfp_client.connect(args.host, args.token or os.environ.get("KFP_TOKEN"), args.namespace)


def _target(args, conn=None):
    """(package or None, (pipeline id, version id) or None, typed params, declared params) for submit/schedule;
    a local package is checked before any network call (conn=None), an uploaded version needs the server."""
    from pipelines import kfp_client, run_args

    if args.pipeline_version and not args.pipeline:
        raise CLIError("--pipeline-version needs --pipeline NAME", EXIT_USAGE)
    if args.pipeline and conn is None:
        return None
    if args.pipeline:
        pipeline_id, version_id, spec = kfp_client.find_version(conn, args.pipeline, args.pipeline_version)
        package, ref, source = None, (pipeline_id, version_id), f"pipeline {args.pipeline!r}"
    else:
        spec, package, ref, source = kfp_client.load_package(args.package), args.package, None, args.package.name
    declared = kfp_client.declared_parameters(spec)
    params = kfp_client.typed_params(args.param, declared, source)
    run_args.validate_run_params(params, flag=lambda key: f"-p {key}")  # what `run` would refuse is not sent
    return package, ref, params, declared


def cmd_upload(args) -> int:
    from pipelines import kfp_client

    version = args.version or kfp_client.default_version_name()
    kfp_client.load_package(args.package)
    conn = _connect(args)
    result = kfp_client.upload(conn, args.package, args.pipeline, version, args.description)
    print(("created pipeline" if result["created_pipeline"] else "pipeline")
          + f" {args.pipeline!r} ({result['pipeline_id']}): uploaded version {version!r} ({result['version_id']})")
    print(f"  {result['link']}")
    return 0


def cmd_submit(args) -> int:
    from pipelines import kfp_client

    local = _target(args)
    conn = _connect(args)
    package, ref, params, declared = local or _target(args, conn)
    run_name = args.run_name or kfp_client.default_run_name(params, declared)
    run_id = kfp_client.submit(conn, args.experiment, run_name, params, package=package, version_ref=ref)
    print(f"run {run_id} ({run_name!r}) created in experiment {args.experiment!r}")
    print(f"  {conn.run_link(run_id)}")
    if not args.wait:
        return 0
    stuck = pending.PendingWatch(run_id, args.pending_limit, args.kube_context)  # its notes go to stdout
    state = kfp_client.wait(conn, run_id, args.timeout, stuck=stuck)
    print(f"run {run_id} ended {state}: {conn.run_link(run_id)}")
    return 0 if state == "SUCCEEDED" else EXIT_FAILURE


def cmd_schedule(args) -> int:
    from pipelines import kfp_client

    local = _target(args)
    conn = _connect(args)
    package, ref, params, _ = local or _target(args, conn)
    result = kfp_client.schedule(conn, args.experiment, args.name, params, cron=args.cron, interval=args.every,
                                 replace=args.replace, package=package, version_ref=ref)
    when = f"cron {args.cron!r}" if args.cron else f"every {args.every} s"
    replaced = f", replacing {', '.join(result['replaced'])}" if result["replaced"] else ""
    print(f"recurring run {result['recurring_run_id']} ({args.name}) created in experiment {args.experiment!r}: "
          f"{when}, max concurrency 1, no catch-up{replaced}")
    return 0


def _store_or_none(args):
    from components.steps import connect

    endpoint = args.s3_endpoint or os.environ.get("S3_ENDPOINT")
    return connect(endpoint, args.bucket, args.prefix) if endpoint else None


def cmd_fetch_weights(args) -> int:
    from components.weights import fetch_weights

    result = fetch_weights(args.model_type, url=args.url, sha256=args.sha256, store=_store_or_none(args))
    print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    return 0


def cmd_ingest(args) -> int:
    from components.datasets.coco import parse_categories
    from components.datasets.ingest import ingest
    from components.datasets.sources import name_from_source

    store = _store_or_none(args)
    with contextlib.ExitStack() as stack:
        if store is None:  # the step still validates, splits and hashes: into a throwaway local server
            from components.s3server import embedded_s3
            from components.storage import ObjectStore

            store = ObjectStore(stack.enter_context(embedded_s3(prefix=args.prefix, bucket=args.bucket)))
            print("sam-pipeline: no --s3-endpoint/S3_ENDPOINT: ingesting into a temporary local store",
                  file=sys.stderr)
        name = args.dataset_name or name_from_source(args.source, args.dataset_format)
        result = ingest(args.source, args.dataset_format, name, store, seed=args.split_seed,
                        verify=args.verify, categories=parse_categories(args.categories), keep_empty=args.keep_empty)
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    return 0


def _report(e: UserError) -> str:
    """A user-facing error as printed: one line, or a summary line and one line per problem (each naming its
    file), as `DatasetError.problems` carries them."""
    head, problems = f"sam-pipeline: error: {first_line(e)}", getattr(e, "problems", None) or []
    if len(problems) == 1:  # one problem stays one line
        return f"{head} {problems[0]}"
    return "\n".join([head, *(f"  {p}" for p in problems)])


def main(argv: list[str] | None = None) -> int:
    """Any `UserError` ends the command with its line(s) and a non-zero exit; anything else is a bug and
    keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args) or 0
    except UserError as e:
        print(_report(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sam-pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
