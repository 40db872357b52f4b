"""`sam-pipeline`: compile | run | submit | schedule | fetch-weights | ingest.

Errors from our own modules (storage, download, registry, datasets, ...) end the command with one line
`sam-pipeline: error: ...` and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from components.errors import UserError
from components.weights import MODEL_TYPES

EXIT_USAGE, EXIT_FAILURE = 2, 1


class CLIError(UserError):
    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise CLIError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


# -- argument types -------------------------------------------------------------------------------

def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} must be >= {lo}")
        return value
    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N, mps)")
    return text


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key.strip(), value


_CRON_FIELDS = (("second", 0, 59, None), ("minute", 0, 59, None), ("hour", 0, 23, None),
                ("day of month", 1, 31, None),
                ("month", 1, 12, "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()),
                ("day of week", 0, 6, "SUN MON TUE WED THU FRI SAT".split()))


def validate_cron(expr: str) -> str:
    """KFP's 6-field cron (robfig/cron: second minute hour day-of-month month day-of-week)."""
    fields = expr.split()
    if len(fields) != 6:
        raise CLIError(f"cron {expr!r} has {len(fields)} fields; KFP needs 6 (second minute hour day-of-month "
                       "month day-of-week), e.g. '0 0 3 * * *' for 03:00 daily", EXIT_USAGE)
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                raise CLIError(f"cron {expr!r}: bad step {step!r} in the {name} field", EXIT_USAGE)
            if base in ("*", "?") and (base == "*" or name in ("day of month", "day of week")):
                continue
            for bound in base.split("-", 1):
                if names and bound.upper() in names:
                    continue
                if not bound.isdigit() or not lo <= int(bound) <= hi:
                    raise CLIError(f"cron {expr!r}: {bound!r} is not a valid {name} ({lo}-{hi})", EXIT_USAGE)
    return expr


def parse_interval(text: str) -> int:
    """'24h', '30m', '1d', '90s', '1h30m' -> seconds."""
    parts = re.findall(r"(\d+)\s*([smhd])", text.strip().lower())
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text.strip().lower()):
        raise CLIError(f"--every {text!r}: use a duration like 24h, 30m, 1d or 1h30m", EXIT_USAGE)
    seconds = sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)
    if seconds < 60:
        raise CLIError(f"--every {text!r}: the interval must be at least 1 minute", EXIT_USAGE)
    return seconds


# -- parser ---------------------------------------------------------------------------------------

def _add_seed_flags(p: argparse.ArgumentParser) -> None:
    # Names and defaults come from TrainConfig (the one place they are stated); the short flags are the seed's.
    from components.training.config import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training (the seed's flags)")
    g.add_argument("-d", "--debug_with_one_example", action="store_true", default=d.debug_with_one_example,
                   help="train on a single example")
    g.add_argument("-c", "--checkpoint_name", default=d.checkpoint_name, help="checkpoints/<name>/{best,latest}.pt")
    g.add_argument("-m", "--model_type", default=d.model_type, choices=MODEL_TYPES)
    g.add_argument("-b", "--batch_size", type=_int_at_least(1), default=d.batch_size)
    g.add_argument("-n", "--n_objects_per_batch", type=_int_at_least(1), default=d.n_objects_per_batch)
    g.add_argument("-g", "--device", type=_device, default=d.device,
                   help="cuda (falls back to cpu with a notice when there is no GPU) or cpu")
    g.add_argument("-i", "--n_iterations", type=_int_at_least(1), default=d.n_iterations)
    g.add_argument("-s", "--n_sub_iteration", type=_int_at_least(1), default=d.n_sub_iteration)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--val-every", dest="val_every", type=_int_at_least(1), default=d.val_every,
                   help="validate every N iterations")


def _add_store_flags(p: argparse.ArgumentParser, *, local_default: bool) -> None:
    g = p.add_argument_group("object store")
    g.add_argument("--s3-endpoint", default=None,
                   help=("host:port of an S3 store (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); "
                         + ("default: an S3 server started on 127.0.0.1 for this run" if local_default
                            else "default: S3_ENDPOINT")))
    g.add_argument("--bucket", default="mlpipeline")
    g.add_argument("--prefix", default="sam-pipeline/")


def build_parser() -> argparse.ArgumentParser:
    from pipelines.sam_finetune import DEFAULT_YAML, PENN_FUDAN_URL

    parser = _Parser(prog="sam-pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("compile", help="write the pipeline YAML (committed as pipelines/sam_finetune.yaml)")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_YAML)
    p.add_argument("--registry", help="image registry (default localhost, or SAM_IMAGE_REGISTRY)")
    p.add_argument("--tag", help="image tag (default 0.1.0, or SAM_IMAGE_TAG)")
    p.add_argument("--gpu-node-selector", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="node selector for the GPU steps (repeatable; default nvidia.com/gpu.present=true; "
                        "'none' to drop)")
    p.add_argument("--gpu-toleration", action="append", metavar="KEY[:EFFECT]",
                   help="toleration (operator Exists) for the GPU steps (repeatable; default nvidia.com/gpu:NoSchedule; "
                        "'none' to drop)")
    p.add_argument("--shm-size", default="2Gi", help="memory-backed /dev/shm for finetune and evaluate")
    p.add_argument("--retries", type=_int_at_least(0), default=3, help="finetune retries (resume from latest.pt)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run the whole pipeline here (kfp.local + an S3 server on 127.0.0.1)")
    _add_seed_flags(p)
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--dataset-source", default=PENN_FUDAN_URL, help="URL, zip, folder or s3:// uri")
    g.add_argument("--dataset-format", default="auto", choices=("auto", "penn-fudan", "folder"))
    g.add_argument("--dataset-name", default="penn-fudan")
    g.add_argument("--weights-url", default="", help="checkpoint URL or local file (default: the catalogue)")
    g.add_argument("--weights-sha256", default="", help="expected sha256 of --weights-url")
    g.add_argument("--margin", type=float, default=0.0,
                   help="register only if fine-tuned box Dice >= zero-shot (and champion) + margin")
    g.add_argument("--model-name", default="sam-pennfudan")
    g.add_argument("--model-registry-url", default="", help="also register in Kubeflow Model Registry")
    g.add_argument("--demo", action="store_true",
                   help="offline: a synthetic Penn-Fudan-like dataset and a random vit_t checkpoint")
    g.add_argument("--demo-images", type=_int_at_least(6), default=12)
    _add_store_flags(p, local_default=True)
    g = p.add_argument_group("output")
    g.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"),
                   help="where kfp.local keeps task outputs")
    g.add_argument("--summary-json", type=Path, help="write a machine-readable summary here")
    g.add_argument("--retries", type=_int_at_least(0), default=0, help="finetune retries (resume from latest.pt)")
    g.add_argument("--keep-runs", type=_int_at_least(1), default=5, help="older local runs are deleted")
    p.set_defaults(func=cmd_run)

    for name, helptext in (("submit", "create a run on a KFP cluster from the compiled package"),
                           ("schedule", "create a recurring run (max concurrency 1, no catch-up)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
        p.add_argument("--package", type=Path, default=DEFAULT_YAML, help="compiled pipeline YAML")
        p.add_argument("--experiment", default="sam-pipeline")
        p.add_argument("--namespace", default=None, help="multi-user deployments")
        p.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (or KFP_TOKEN)")
        p.add_argument("-p", "--param", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                       help="pipeline parameter (repeatable)")
        if name == "submit":
            p.add_argument("--run-name", default=None)
            p.add_argument("--wait", action="store_true", help="wait until the run finishes")
            p.add_argument("--timeout", type=_int_at_least(1), default=6 * 3600, help="seconds, with --wait")
            p.set_defaults(func=cmd_submit)
        else:
            when = p.add_mutually_exclusive_group(required=True)
            when.add_argument("--cron", help="6 fields: second minute hour day-of-month month day-of-week")
            when.add_argument("--every", help="interval, e.g. 24h")
            p.add_argument("--name", default="sam-finetune-scheduled")
            p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("fetch-weights", help="run the fetch-weights step alone; prints a JSON summary")
    p.add_argument("-m", "--model-type", "--model_type", dest="model_type", default="vit_t", choices=MODEL_TYPES)
    p.add_argument("--url", default=None)
    p.add_argument("--sha256", default=None)
    _add_store_flags(p, local_default=False)
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("ingest", help="run the ingest-dataset step alone; prints a JSON summary")
    p.add_argument("--source", default=PENN_FUDAN_URL, help="URL, zip, folder or s3:// uri")
    p.add_argument("--format", dest="dataset_format", default="auto", choices=("auto", "penn-fudan", "folder"))
    p.add_argument("--name", dest="dataset_name", default="penn-fudan")
    p.add_argument("--split-seed", type=int, default=0)
    _add_store_flags(p, local_default=False)
    p.set_defaults(func=cmd_ingest)
    return parser


# -- commands -------------------------------------------------------------------------------------

def cmd_compile(args) -> int:
    from pipelines.images import ImageError, image_refs
    from pipelines.sam_finetune import Placement, compile_pipeline

    try:
        images = image_refs(args.registry, args.tag)
    except ImageError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    kw = {"images": images, "shm_size": args.shm_size,
          "finetune_retries": args.retries}
    if args.gpu_node_selector:
        kw["gpu_node_selector"] = {k: v for k, v in args.gpu_node_selector if k != "none"}
    if args.gpu_toleration:
        kw["gpu_tolerations"] = tuple((t.partition(":")[0], t.partition(":")[2] or "NoSchedule")
                                      for t in args.gpu_toleration if t != "none")
        for _, effect in kw["gpu_tolerations"]:
            if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise CLIError(f"--gpu-toleration effect {effect!r}: use NoSchedule, PreferNoSchedule or NoExecute",
                               EXIT_USAGE)
    path = compile_pipeline(args.output, Placement(**kw))
    print(f"wrote {path}")
    return 0


def _cuda_or_cpu(device: str) -> str:
    """The local run's device: the pipeline's steps see a plain cpu rather than each warning on its own."""
    if not device.startswith("cuda"):
        return device
    from components.sam.device import resolve_device

    chosen = str(resolve_device(device, notice=False))
    if chosen == "cpu":
        print("sam-pipeline: no CUDA device here; running on cpu (pass -g cpu to silence this)", file=sys.stderr)
    return chosen if chosen == "cpu" else device


def run_params(args) -> dict:
    """Pipeline arguments from `run`'s flags (no credentials: those travel as environment variables)."""
    from components.training.config import PIPELINE_SETTINGS

    return {
        **{name: getattr(args, name) for name in PIPELINE_SETTINGS}, "dataset_source": args.dataset_source,
        "dataset_format": args.dataset_format, "dataset_name": args.dataset_name,
        "weights_url": args.weights_url, "weights_sha256": args.weights_sha256, "bucket": args.bucket,
        "prefix": args.prefix, "margin": args.margin, "model_name": args.model_name,
        "model_registry_url": args.model_registry_url,
    }


def cmd_run(args) -> int:
    from pipelines import local

    if "/" in args.checkpoint_name or args.checkpoint_name in ("", ".", ".."):
        raise CLIError(f"--checkpoint_name {args.checkpoint_name!r} must be a plain folder name", EXIT_USAGE)
    if args.demo:
        if args.model_type != "vit_t":
            raise CLIError("--demo builds a random vit_t checkpoint; drop -m/--model_type", EXIT_USAGE)
        assets = local.make_demo_assets(Path("runs/demo"), images=args.demo_images)
        args.dataset_source, args.weights_url, args.weights_sha256 = (
            assets["dataset_source"], assets["weights_url"], assets["weights_sha256"])
        args.dataset_name = "synthetic-penn-fudan"
        if args.model_name == "sam-pennfudan":
            args.model_name = "sam-demo"
    from components.datasets.sources import cache_path

    if not cache_path(args.dataset_source).is_file():  # a dataset cached by an earlier run works offline
        local.check_reachable(args.dataset_source, "dataset")
    if args.weights_url:
        local.check_reachable(args.weights_url, "weights")
    else:
        url, cached = local.default_weights_url(args.model_type)
        if cached is None:
            local.check_reachable(url, f"{args.model_type} weights")
    args.device = _cuda_or_cpu(args.device)

    summary = local.run_local(run_params(args), pipeline_root=args.pipeline_root, s3_endpoint=args.s3_endpoint,
                              retries=args.retries)
    summary["checkpoints"] = local.find_checkpoints(args.checkpoint_name)
    local.remove_old_runs(args.pipeline_root, keep=args.keep_runs)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    _print_run(summary, args)
    if not summary["succeeded"]:
        failed = [t for t, i in summary["tasks"].items() if i["state"] in ("FAILED", "NOT_RUN")]
        raise CLIError(f"pipeline failed at {', '.join(failed) or 'an unknown task'}; its log is above"
                       + (f"; summary in {args.summary_json}" if args.summary_json else ""))
    return 0


def _print_run(summary: dict, args) -> None:
    out = sys.stdout
    print("\n== sam-pipeline run ==", file=out)
    for name, info in summary["tasks"].items():
        secs = f" {info['seconds']:.1f}s" if "seconds" in info else ""
        print(f"  {name:<15} {info['state']}{secs}", file=out)
    m = summary.get("metrics", {})
    if "finetuned_box_dice" in m:
        print(f"  box Dice: fine-tuned {m['finetuned_box_dice']:.4f}, zero-shot {m.get('zero_shot_box_dice', 0):.4f}"
              + (f", champion {m['champion_box_dice']:.4f}" if m.get("champion_box_dice") is not None else "")
              + f" -> passed={summary.get('passed')} (margin {args.margin})", file=out)
    for name, path in summary.get("checkpoints", {}).items():
        print(f"  checkpoint {name}: {path}", file=out)
    for task, path in summary.get("reports", {}).items():
        print(f"  {task} report: {path}", file=out)
    if summary.get("registered"):
        r = summary["registered"]
        print(f"  registered {args.model_name} {r['version']}: {r['model_uri']}", file=out)
        if summary["object_store"]["embedded"] and summary.get("registered_copy"):
            print(f"    (the embedded store is gone after the run; copy kept at {summary['registered_copy']['model']})",
                  file=out)
    elif summary["tasks"]["register-model"]["state"] == "SKIPPED":
        print("  register-model skipped: the fine-tuned model did not beat the bar", file=out)
    if args.summary_json:
        print(f"  summary: {args.summary_json}", file=out)


def _client(args):
    import urllib.error
    import urllib.request
    import warnings

    host = args.host.rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise CLIError(f"--host {args.host!r} must start with http:// or https://", EXIT_USAGE)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        urllib.request.urlopen(urllib.request.Request(f"{host}/apis/v2beta1/healthz", headers=headers),
                               timeout=10).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise CLIError(f"KFP at {host} refused the request (HTTP {e.code}); pass --token") from None
        raise CLIError(f"KFP at {host} answered HTTP {e.code} on /apis/v2beta1/healthz; is it the KFP API "
                       "endpoint (e.g. kubectl port-forward svc/ml-pipeline-ui 8080:80)?") from None
    except (urllib.error.URLError, OSError) as e:
        raise CLIError(f"KFP at {host} is unreachable ({getattr(e, 'reason', e)})") from None
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, namespace=args.namespace or "kubeflow", existing_token=args.token)


def _package_and_params(args) -> tuple[str, dict]:
    import yaml

    if not args.package.is_file():
        raise CLIError(f"{args.package}: no such pipeline package; run `sam-pipeline compile` first")
    with open(args.package) as f:
        spec = next(yaml.safe_load_all(f))
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    params = {}
    for key, raw in args.param:
        if key not in declared:
            raise CLIError(f"-p {key}: not a parameter of {args.package.name} "
                           f"(known: {', '.join(sorted(declared))})", EXIT_USAGE)
        params[key] = _typed(key, raw, declared[key].get("parameterType", "STRING"))
    return str(args.package), params


def _typed(key: str, raw: str, kind: str):
    try:
        if kind == "NUMBER_INTEGER":
            return int(raw)
        if kind == "NUMBER_DOUBLE":
            return float(raw)
        if kind == "BOOLEAN":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
    except ValueError:
        raise CLIError(f"-p {key}={raw}: expected {kind.lower().replace('number_', '')}", EXIT_USAGE) from None
    return raw


def _api_error(what: str, host: str, e: Exception) -> CLIError:
    status = getattr(e, "status", None)
    body = getattr(e, "body", None) or str(e)
    try:
        body = json.loads(body).get("message", body)
    except (ValueError, AttributeError, TypeError):
        pass
    first = str(body).strip().splitlines()[0] if str(body).strip() else type(e).__name__
    return CLIError(f"{what} on {host} failed" + (f" (HTTP {status})" if status else "") + f": {first}")


def cmd_submit(args) -> int:
    package, params = _package_and_params(args)
    client = _client(args)
    try:
        result = client.create_run_from_pipeline_package(
            package, arguments=params, run_name=args.run_name, experiment_name=args.experiment,
            namespace=args.namespace)
    except Exception as e:  # kfp_server_api ApiException and urllib3 errors
        raise _api_error("creating the run", args.host, e) from None
    print(f"run {result.run_id} created in experiment {args.experiment!r}")
    if args.wait:
        try:
            run = client.wait_for_run_completion(result.run_id, timeout=args.timeout)
        except TimeoutError:
            raise CLIError(f"run {result.run_id} did not finish within {args.timeout} s") from None
        except Exception as e:
            raise _api_error("waiting for the run", args.host, e) from None
        state = str(run.state)
        print(f"run {result.run_id} finished: {state}")
        return 0 if state == "SUCCEEDED" else EXIT_FAILURE
    return 0


def cmd_schedule(args) -> int:
    cron = validate_cron(args.cron) if args.cron else None
    interval = parse_interval(args.every) if args.every else None
    package, params = _package_and_params(args)
    client = _client(args)
    try:
        experiment = client.create_experiment(args.experiment, namespace=args.namespace)
        rr = client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=args.name,
            description="scheduled retraining of SAM; registers only when it beats the champion",
            cron_expression=cron, interval_second=interval, max_concurrency=1, no_catchup=True,
            params=params, pipeline_package_path=package, enabled=True)
    except Exception as e:
        raise _api_error("creating the recurring run", args.host, e) from None
    when = f"cron {cron!r}" if cron else f"every {interval} s"
    print(f"recurring run {rr.recurring_run_id} ({args.name}) created: {when}, max concurrency 1, no catch-up")
    return 0


def _store_or_none(args):
    from components.storage import ObjectStore, S3Config

    endpoint = args.s3_endpoint or os.environ.get("S3_ENDPOINT")
    if not endpoint:
        return None
    return ObjectStore(S3Config.from_env(endpoint=endpoint, bucket=args.bucket, prefix=args.prefix))


def cmd_fetch_weights(args) -> int:
    from components.weights import fetch_weights

    result = fetch_weights(args.model_type, url=args.url, sha256=args.sha256, store=_store_or_none(args))
    print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    return 0


def cmd_ingest(args) -> int:
    import contextlib

    from components.datasets.ingest import ingest

    store = _store_or_none(args)
    with contextlib.ExitStack() as stack:
        if store is None:
            # Without a store the step still validates, splits and hashes: into a throwaway local server.
            from components.s3server import embedded_s3
            from components.storage import ObjectStore

            cfg = stack.enter_context(embedded_s3(prefix=args.prefix, bucket=args.bucket))
            store = ObjectStore(cfg)
            print("sam-pipeline: no --s3-endpoint/S3_ENDPOINT: ingesting into a temporary local store",
                  file=sys.stderr)
        result = ingest(args.source, args.dataset_format, args.dataset_name, store, seed=args.split_seed)
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    return 0


def _ours(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] in ("components", "pipelines")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args) or 0
    except CLIError as e:
        print(f"sam-pipeline: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("sam-pipeline: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _ours(e):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"sam-pipeline: error: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
