"""Every call `sam-pipeline` makes to a Kubeflow Pipelines (v2beta1) API server: connect with a health check
that reaches the API server itself, upload a pipeline version, submit a run and wait for it, create or
replace a recurring run; plus the cron/interval parsing the schedule needs.

The API shapes follow kfp 2.17's `kfp.Client` and upstream kubeflow/pipelines `backend/api/v2beta1/*.proto`.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from components.errors import UserError, first_line

# kubeflow/pipelines backend/api/v2beta1/run.proto `enum RuntimeState`: SUCCEEDED, SKIPPED, FAILED and
# CANCELED are final; CANCELING only moves on to one of those and PAUSED waits for a person, so waiting on
# either would hang a script for hours. (kfp.Client.wait_for_run_completion knows only the first three.)
END_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELING", "PAUSED")
POLL_SECONDS = 10.0        # between two looks at a run while waiting
RECONNECT_TRIES = 5        # failed looks in a row (a dropped port-forward) before giving up on waiting
DEFAULT_PIPELINE = "sam-finetune"  # the pipelineInfo.name the compiler writes


class KFPError(UserError):
    """A KFP server refused or failed a request, or is not a KFP API server."""


class UsageError(KFPError):
    """Bad command-line input (the CLI exits 2)."""

    exit_code = 2


class RunDetached(KFPError):
    """The run was created but we could not follow it to the end; it goes on on the cluster."""


# -- schedules ------------------------------------------------------------------------------------

_CRON_FIELDS = (("second", 0, 59, None), ("minute", 0, 59, None), ("hour", 0, 23, None),
                ("day of month", 1, 31, None),
                ("month", 1, 12, "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()),
                ("day of week", 0, 6, "SUN MON TUE WED THU FRI SAT".split()))


def validate_cron(expr: str) -> str:
    """KFP's 6-field cron (robfig/cron: second minute hour day-of-month month day-of-week)."""
    fields = expr.split()
    if len(fields) != 6:
        raise UsageError(f"cron {expr!r} has {len(fields)} fields; KFP needs 6 (second minute hour day-of-month "
                         "month day-of-week), e.g. '0 0 3 * * *' for 03:00 daily")
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                raise UsageError(f"cron {expr!r}: bad step {step!r} in the {name} field")
            if base in ("*", "?") and (base == "*" or name in ("day of month", "day of week")):
                continue
            for bound in base.split("-", 1):
                if names and bound.upper() in names:
                    continue
                if not bound.isdigit() or not lo <= int(bound) <= hi:
                    raise UsageError(f"cron {expr!r}: {bound!r} is not a valid {name} ({lo}-{hi})")
    return expr


def parse_interval(text: str) -> int:
    """'24h', '30m', '1d', '90s', '1h30m' -> seconds."""
    parts = re.findall(r"(\d+)\s*([smhd])", text.strip().lower())
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text.strip().lower()):
        raise UsageError(f"--every {text!r}: use a duration like 24h, 30m, 1d or 1h30m")
    seconds = sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)
    if seconds < 60:
        raise UsageError(f"--every {text!r}: the interval must be at least 1 minute")
    return seconds


# -- pipeline specs and parameters ----------------------------------------------------------------

def load_package(path: Path) -> dict:
    """The PipelineSpec document of a compiled package (the first YAML document)."""
    import yaml

    if not Path(path).is_file():
        raise KFPError(f"{path}: no such pipeline package; run `sam-pipeline compile` first")
    with open(path) as f:
        return next(yaml.safe_load_all(f))


def declared_parameters(spec: dict) -> dict:
    """name -> {parameterType, defaultValue?} of a PipelineSpec, also when it is wrapped with a platform spec
    as the API server returns uploaded versions ({"pipeline_spec": ..., "platform_spec": ...}: upstream
    backend/src/apiserver/server/api_util.go)."""
    spec = spec.get("pipeline_spec", spec) if "root" not in spec else spec
    return spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})


def typed_params(pairs: list[tuple[str, str]], declared: dict, source: str) -> dict:
    """-p KEY=VALUE pairs checked against the declared parameters and converted to their types."""
    params = {}
    for key, raw in pairs:
        if key not in declared:
            raise UsageError(f"-p {key}: not a parameter of {source} (known: {', '.join(sorted(declared))})")
        params[key] = _typed(key, raw, declared[key].get("parameterType", "STRING"))
    return params


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
        raise UsageError(f"-p {key}={raw}: expected {kind.lower().replace('number_', '')}") from None
    return raw


def default_run_name(params: dict, declared: dict, now: datetime | None = None) -> str:
    """`sam-finetune <dataset> <UTC time>`: the runs list in the UI says what each run trained on."""
    dataset = params.get("dataset_name") or declared.get("dataset_name", {}).get("defaultValue") or "dataset"
    now = now or datetime.now(timezone.utc)
    return f"{DEFAULT_PIPELINE} {dataset} {now:%Y-%m-%d %H:%M:%S} UTC"


def default_version_name(repo: Path | None = None) -> str:
    """`<package version>-<short commit>[-dirty]`: which code a pipeline version in the UI came from."""
    from importlib.metadata import PackageNotFoundError, version

    repo = repo or Path(__file__).resolve().parents[1]
    try:
        package_version = version("sam-pipeline")
    except PackageNotFoundError:
        raise UsageError("sam-pipeline is not installed, so it has no version; pass --version") from None

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        raise UsageError(f"{repo} is not a git checkout, so there is no commit to name the version after; "
                         "pass --version") from None
    return f"{package_version}-{sha}" + ("-dirty" if dirty else "")


# -- connection -----------------------------------------------------------------------------------

@dataclass
class Connection:
    host: str
    namespace: str | None
    client: object  # kfp.Client

    def run_link(self, run_id: str) -> str:
        return f"{self.host}/#/runs/details/{run_id}"

    def pipeline_link(self, pipeline_id: str, version_id: str) -> str:
        return f"{self.host}/#/pipelines/details/{pipeline_id}/version/{version_id}"


def connect(host: str, token: str | None = None, namespace: str | None = None) -> Connection:
    host = host.rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise UsageError(f"--host {host!r} must start with http:// or https://")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    health = _get_json(host, "/apis/v2beta1/healthz", headers)
    # The UI's own server (kubeflow/pipelines frontend/server/handlers/healthz.ts) answers healthz itself with
    # 200 and `apiServerReady: false` when the API server behind it is down; the API server itself answers
    # its healthzResponse (backend/src/apiserver/main.go: commit_sha, tag_name, multi_user, pipeline_store).
    if not isinstance(health, dict) or not health.keys() & {"commit_sha", "multi_user", "apiServerReady"}:
        raise KFPError(f"{host} answered /apis/v2beta1/healthz, but not like a KFP API server; is --host the KFP "
                       "endpoint (e.g. kubectl port-forward svc/ml-pipeline-ui 8080:80)?")
    if health.get("apiServerReady") is False:
        raise KFPError(f"the KFP UI at {host} answers, but its API server does not (apiServerReady: false); "
                       "check `kubectl -n kubeflow get deploy ml-pipeline`")
    # A real call through the same path as the commands that follow (the cheapest one there is).
    query = "?" + urllib.parse.urlencode({"page_size": 1, **({"namespace": namespace} if namespace else {})})
    _get_json(host, f"/apis/v2beta1/experiments{query}", headers, client_errors_ok=True)
    import warnings

    import kfp

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore", FutureWarning)
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
    return Connection(host, namespace, client)


def _get_json(host: str, path: str, headers: dict, client_errors_ok: bool = False):
    try:
        with urllib.request.urlopen(urllib.request.Request(host + path, headers=headers), timeout=10) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise KFPError(f"KFP at {host} refused the request (HTTP {e.code}); pass --token") from None
        if client_errors_ok and e.code < 500:
            return None  # the API server answered (e.g. multi-user without --namespace): it is there
        raise KFPError(f"KFP at {host} answered HTTP {e.code} on {path.split('?')[0]}; the API server is not "
                       "answering behind it (or --host is not the KFP endpoint)") from None
    except (urllib.error.URLError, OSError) as e:
        raise KFPError(f"KFP at {host} is unreachable ({getattr(e, 'reason', e)})") from None
    try:
        return json.loads(body)
    except ValueError:
        raise KFPError(f"{host}{path.split('?')[0]} did not answer JSON; is --host the KFP endpoint?") from None


@contextlib.contextmanager
def _quiet():
    """kfp.Client prints its own 'Run details: ...' lines; the CLI prints one summary of its own."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def api_error(what: str, host: str, e: Exception) -> KFPError:
    status = getattr(e, "status", None)
    body = getattr(e, "body", None) or str(e)
    try:
        body = json.loads(body).get("message", body)
    except (ValueError, AttributeError, TypeError):
        pass
    first = str(body).strip().splitlines()[0] if str(body).strip() else type(e).__name__
    return KFPError(f"{what} on {host} failed" + (f" (HTTP {status})" if status else "") + f": {first}")


def _call(conn: Connection, what: str, fn, *args, **kwargs):
    try:
        with _quiet():
            return fn(*args, **kwargs)
    except KFPError:
        raise
    except Exception as e:  # kfp_server_api ApiException, urllib3 errors, kfp's ValueErrors
        raise api_error(what, conn.host, e) from None


def _by_name(name: str) -> str:
    # backend/api/v2beta1/filter.proto; kfp.Client.get_pipeline_id builds the same filter.
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


# -- pipelines and versions -----------------------------------------------------------------------

def _pipeline_id(conn: Connection, name: str) -> str | None:
    return _call(conn, f"looking up pipeline {name!r}", conn.client.get_pipeline_id, name)


def _version_named(conn: Connection, pipeline_id: str, name: str):
    found = _call(conn, "listing pipeline versions", conn.client.list_pipeline_versions, pipeline_id,
                  page_size=1, filter=_by_name(name)).pipeline_versions
    return found[0] if found else None


def upload(conn: Connection, package: Path, pipeline: str, version: str, description: str) -> dict:
    """One new version of `pipeline` per call (creating the pipeline the first time); refuses a version name
    that is already there rather than shadowing it."""
    pipeline_id = _pipeline_id(conn, pipeline)
    created = pipeline_id is None
    if created:
        # An empty pipeline, then the version: `upload_pipeline` would name the first version after the
        # pipeline instead of after the code (backend/src/apiserver/server/pipeline_upload_server.go).
        import kfp_server_api

        body = kfp_server_api.V2beta1Pipeline(display_name=pipeline, description=description,
                                              namespace=conn.namespace)
        pipeline_id = _call(conn, f"creating pipeline {pipeline!r}",
                            conn.client._pipelines_api.pipeline_service_create_pipeline, body).pipeline_id
    elif _version_named(conn, pipeline_id, version) is not None:
        raise KFPError(f"pipeline {pipeline!r} on {conn.host} already has a version {version!r}; "
                       "pass another --version (or commit your change for a new default name)")
    v = _call(conn, f"uploading version {version!r} of {pipeline!r}", conn.client.upload_pipeline_version,
              str(package), version, pipeline_id=pipeline_id, description=description)
    return {"pipeline_id": pipeline_id, "version_id": v.pipeline_version_id, "created_pipeline": created,
            "link": conn.pipeline_link(pipeline_id, v.pipeline_version_id)}


def find_version(conn: Connection, pipeline: str, version: str | None) -> tuple[str, str, dict]:
    """(pipeline id, version id, its pipeline spec) of an uploaded version; the newest when none is named."""
    pipeline_id = _pipeline_id(conn, pipeline)
    if pipeline_id is None:
        raise KFPError(f"no pipeline {pipeline!r} on {conn.host}; run `sam-pipeline upload` first")
    if version:
        v = _version_named(conn, pipeline_id, version)
    else:
        # "created_at" is a sort key of backend/src/apiserver/model/pipeline_version.go APIToModelFieldMap
        newest = _call(conn, "listing pipeline versions", conn.client.list_pipeline_versions, pipeline_id,
                       page_size=1, sort_by="created_at desc").pipeline_versions
        v = newest[0] if newest else None
    if v is None:
        raise KFPError(f"pipeline {pipeline!r} on {conn.host} has no version "
                       + (f"{version!r}" if version else "yet") + "; run `sam-pipeline upload`")
    return pipeline_id, v.pipeline_version_id, v.pipeline_spec or {}


# -- runs -----------------------------------------------------------------------------------------

def _experiment_id(conn: Connection, experiment: str) -> str:
    return _call(conn, f"finding experiment {experiment!r}", conn.client.create_experiment, experiment,
                 namespace=conn.namespace).experiment_id


def _source(package: Path | None, version_ref: tuple[str, str] | None) -> dict:
    if version_ref:
        return {"pipeline_id": version_ref[0], "version_id": version_ref[1]}
    return {"pipeline_package_path": str(package)}


def submit(conn: Connection, experiment: str, run_name: str, params: dict, *, package: Path | None = None,
           version_ref: tuple[str, str] | None = None) -> str:
    """Create a run in `experiment` from a local package or an uploaded version; returns its id."""
    return _call(conn, "creating the run", conn.client.run_pipeline, _experiment_id(conn, experiment), run_name,
                 params=params, **_source(package, version_ref)).run_id


def _transient(e: Exception) -> bool:
    """A dropped port-forward or a restarting proxy, as opposed to an answer from the API server."""
    import urllib3

    return isinstance(e, (urllib3.exceptions.HTTPError, OSError)) or getattr(e, "status", None) in (0, 502, 503, 504)


def wait(conn: Connection, run_id: str, timeout: float, stuck=None) -> str:
    """Poll the run until it reaches one of END_STATES; returns that state. A dropped connection is retried
    RECONNECT_TRIES times in a row before giving up with RunDetached (the run itself is not affected).
    `stuck`: called at each poll of a run not ended; a line it returns (pipelines/pending.py) ends the wait."""
    import logging

    link = conn.run_link(run_id)
    deadline = time.monotonic() + timeout
    failures = 0
    # urllib3 logs a warning per retry of a dropped connection; the one line below says it instead.
    pool_log = logging.getLogger("urllib3.connectionpool")
    level, pool_log.level = pool_log.level, logging.ERROR
    try:
        while True:
            try:
                state = str(conn.client.get_run(run_id).state or "")
                failures = 0
            except Exception as e:
                if not _transient(e):
                    raise api_error(f"looking at run {run_id}", conn.host, e) from None
                failures += 1
                if failures > RECONNECT_TRIES:
                    reason = first_line(getattr(e, "reason", None) or e).rsplit(": ", 1)[-1]
                    raise RunDetached(f"lost {conn.host} while waiting for run {run_id} ({reason}); the run "
                                      f"continues on the cluster; watch it at {link}") from None
                state = ""
            if state in END_STATES:
                return state
            problem = stuck() if stuck and state else None
            if problem:
                raise RunDetached(f"{problem}; the run stays on the cluster until you delete or fix it: {link}")
            if time.monotonic() > deadline:
                raise RunDetached(f"run {run_id} did not end within {timeout:g} s; the run continues on the "
                                  f"cluster; watch it at {link}")
            time.sleep(POLL_SECONDS * min(2 ** failures, 8))
    finally:
        pool_log.setLevel(level)


# -- recurring runs -------------------------------------------------------------------------------

def schedule(conn: Connection, experiment: str, name: str, params: dict, *, cron: str | None = None,
             interval: int | None = None, replace: bool = False, package: Path | None = None,
             version_ref: tuple[str, str] | None = None) -> dict:
    """Create the recurring run `name` in `experiment` (max concurrency 1, no catch-up). An existing one of
    that name is refused, or deleted first with replace=True, so there is never a second nightly training."""
    experiment_id = _experiment_id(conn, experiment)
    existing = _call(conn, "listing recurring runs", conn.client.list_recurring_runs, experiment_id=experiment_id,
                     page_size=100, filter=_by_name(name)).recurring_runs or []
    # The filter is applied by the server; checking the name again keeps a server that ignores it harmless.
    existing = [rr for rr in existing if rr.display_name == name]
    if existing and not replace:
        raise KFPError(f"experiment {experiment!r} on {conn.host} already has a recurring run {name!r} "
                       f"({existing[0].recurring_run_id}); pass --replace to replace it or --name for another one")
    for rr in existing:
        _call(conn, f"deleting recurring run {rr.recurring_run_id}", conn.client.delete_recurring_run,
              rr.recurring_run_id)
    rr = _call(conn, "creating the recurring run", conn.client.create_recurring_run,
               experiment_id=experiment_id, job_name=name,
               description="scheduled retraining of SAM; registers only when it beats the champion",
               cron_expression=cron, interval_second=interval, max_concurrency=1, no_catchup=True,
               params=params, enabled=True, **_source(package, version_ref))
    return {"recurring_run_id": rr.recurring_run_id, "replaced": [r.recurring_run_id for r in existing]}
