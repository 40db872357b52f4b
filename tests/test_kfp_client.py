"""Contract tests of `sam-pipeline submit | schedule | upload` against the KFP v2beta1 API stand-in of
tests/helpers.py (KFPStandIn; upstream kubeflow/pipelines backend/api/v2beta1/run.proto, recurring_run.proto,
pipeline.proto, filter.proto, frontend/server/handlers/healthz.ts), through the real kfp 2.17 client and
real HTTP on 127.0.0.1."""
from __future__ import annotations

import subprocess
from importlib.metadata import version

import pytest

from pipelines import kfp_client
from pipelines.cli import main


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch):
    monkeypatch.setattr(kfp_client, "POLL_SECONDS", 0.0)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _posted(world, path):
    return [body for method, p, body in world["calls"] if method == "POST" and p == path]


def _one_line_error(err: str, needle: str) -> None:
    assert needle in err, err
    assert err.startswith("sam-pipeline: error: ") and err.count("\n") == 1 and "Traceback" not in err


# -- submit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("state", kfp_client.END_STATES)
def test_submit_wait_ends_on_every_end_state(kfp_api, capsys, state):
    host, world = kfp_api
    world["run_states"] = ["PENDING", "RUNNING", "RUNNING", state]
    code, out, err = run_cli(capsys, "submit", "--host", host, "--wait", "--timeout", "300")
    run_id = out.split()[1]
    assert code == (0 if state == "SUCCEEDED" else 1), err
    assert f"run {run_id} ended {state}: {host}/#/runs/details/{run_id}" in out
    gets = [p for m, p, _ in world["calls"] if m == "GET" and p == f"/apis/v2beta1/runs/{run_id}"]
    assert len(gets) == 4  # it kept looking through PENDING and RUNNING, and stopped at the end state


def test_run_name_defaults_to_the_dataset_and_time(kfp_api, capsys):
    host, world = kfp_api
    assert run_cli(capsys, "submit", "--host", host)[0] == 0
    assert run_cli(capsys, "submit", "--host", host, "-p", "dataset_name=cells", "--experiment", "other")[0] == 0
    first, second = _posted(world, "/apis/v2beta1/runs")
    # penn-fudan: the compiled package's default for dataset_name
    assert first["display_name"].startswith("sam-finetune penn-fudan 20") and first["display_name"].endswith(" UTC")
    assert second["display_name"].startswith("sam-finetune cells 20")
    assert [e["display_name"] for e in world["experiments"]] == ["sam-pipeline", "other"]
    assert second["experiment_id"] == world["experiments"][1]["experiment_id"]


def test_a_dropped_connection_while_waiting_is_one_line(kfp_api, capsys, caplog):
    host, world = kfp_api
    world["run_states"] = ["RUNNING", "DROP"]  # the port-forward goes away and stays away
    code, out, err = run_cli(capsys, "submit", "--host", host, "--wait", "--timeout", "300")
    run_id = out.split()[1]
    assert code == 1
    _one_line_error(err, f"the run continues on the cluster; watch it at {host}/#/runs/details/{run_id}")
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]  # no retry warnings around it


def test_a_connection_that_comes_back_is_waited_through(kfp_api, capsys):
    host, world = kfp_api
    world["run_states"] = ["RUNNING", "DROP", "DROP", "DROP", "DROP", "RUNNING", "SUCCEEDED"]
    code, out, err = run_cli(capsys, "submit", "--host", host, "--wait", "--timeout", "300")
    assert code == 0, err
    assert "ended SUCCEEDED" in out


def test_wait_timeout_leaves_the_run_alone(kfp_api, capsys, monkeypatch):
    monkeypatch.setattr(kfp_client, "POLL_SECONDS", 0.05)
    host, world = kfp_api
    world["run_states"] = ["RUNNING"]
    code, out, err = run_cli(capsys, "submit", "--host", host, "--wait", "--timeout", "1")
    run_id = out.split()[1]
    assert code == 1
    _one_line_error(err, f"run {run_id} did not end within 1 s; the run continues on the cluster")
    assert not [c for c in world["calls"] if c[0] == "DELETE" or c[1].endswith(":terminate")]


# -- health check ---------------------------------------------------------------------------------

def test_a_ui_proxy_without_its_api_server_is_refused(kfp_api, capsys):
    host, world = kfp_api
    world["api_down"] = True
    code, _, err = run_cli(capsys, "submit", "--host", host)
    assert code == 1
    _one_line_error(err, f"the KFP UI at {host} answers, but its API server does not")
    assert not _posted(world, "/apis/v2beta1/runs")


def test_a_server_that_is_not_kfp_is_refused(http_server, tmp_path, capsys):
    host = http_server(tmp_path)  # a plain web server: healthz is a 404
    code, _, err = run_cli(capsys, "schedule", "--host", host, "--every", "1d")
    assert code == 1
    _one_line_error(err, f"KFP at {host} answered HTTP 404 on /apis/v2beta1/healthz")

    # a web app that answers every path with its page, or with JSON of its own
    healthz = tmp_path / "apis" / "v2beta1" / "healthz"
    healthz.parent.mkdir(parents=True)
    healthz.write_text("<html>sign in</html>")
    code, _, err = run_cli(capsys, "upload", "--host", host, "--version", "v1")
    _one_line_error(err, f"{host}/apis/v2beta1/healthz did not answer JSON")
    healthz.write_text('{"status": "ok"}')
    code, _, err = run_cli(capsys, "submit", "--host", host)
    _one_line_error(err, f"{host} answered /apis/v2beta1/healthz, but not like a KFP API server")


# -- schedule -------------------------------------------------------------------------------------

def test_schedule_refuses_a_second_recurring_run_of_the_same_name(kfp_api, capsys):
    host, world = kfp_api
    assert run_cli(capsys, "schedule", "--host", host, "--cron", "0 0 3 * * *")[0] == 0
    (first,) = world["recurring_runs"]
    code, _, err = run_cli(capsys, "schedule", "--host", host, "--cron", "0 0 4 * * *")
    assert code == 1
    _one_line_error(err, f"already has a recurring run 'sam-finetune-scheduled' ({first['recurring_run_id']}); "
                         "pass --replace")
    assert world["recurring_runs"] == [first]
    # the same name in another experiment, or another name, is another schedule
    assert run_cli(capsys, "schedule", "--host", host, "--every", "1d", "--experiment", "other")[0] == 0
    assert run_cli(capsys, "schedule", "--host", host, "--every", "1d", "--name", "weekly")[0] == 0
    assert len(world["recurring_runs"]) == 3


def test_schedule_replace_deletes_the_old_one(kfp_api, capsys):
    host, world = kfp_api
    assert run_cli(capsys, "schedule", "--host", host, "--cron", "0 0 3 * * *")[0] == 0
    (old,) = world["recurring_runs"]
    code, out, err = run_cli(capsys, "schedule", "--host", host, "--cron", "0 30 4 * * *", "--replace")
    assert code == 0, err
    (new,) = world["recurring_runs"]
    assert new["trigger"] == {"cron_schedule": {"cron": "0 30 4 * * *"}}
    assert ("DELETE", f"/apis/v2beta1/recurringruns/{old['recurring_run_id']}", {}) in world["calls"]
    assert f"replacing {old['recurring_run_id']}" in out and new["recurring_run_id"] in out


# -- upload and runs of uploaded versions ---------------------------------------------------------

def test_upload_creates_the_pipeline_then_adds_versions_and_refuses_duplicates(kfp_api, capsys):
    host, world = kfp_api
    code, out, err = run_cli(capsys, "upload", "--host", host, "--version", "v1")
    assert code == 0, err
    (pipeline,) = world["pipelines"]
    assert pipeline["display_name"] == "sam-finetune" and out.startswith("created pipeline 'sam-finetune'")
    code, out, err = run_cli(capsys, "upload", "--host", host, "--version", "v2")
    assert code == 0, err
    assert len(world["pipelines"]) == 1 and out.startswith("pipeline 'sam-finetune'")
    assert [v["display_name"] for v in world["versions"]] == ["v1", "v2"]
    assert world["versions"][1]["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "sam-finetune"
    v2 = world["versions"][1]
    assert f"{host}/#/pipelines/details/{pipeline['pipeline_id']}/version/{v2['pipeline_version_id']}" in out

    code, _, err = run_cli(capsys, "upload", "--host", host, "--version", "v1")
    assert code == 1
    _one_line_error(err, "pipeline 'sam-finetune' on " + host + " already has a version 'v1'")
    assert len(world["versions"]) == 2


def test_upload_default_version_is_package_version_and_commit(kfp_api, capsys):
    host, world = kfp_api
    assert run_cli(capsys, "upload", "--host", host)[0] == 0
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    (v,) = world["versions"]
    assert v["display_name"] in (f"{version('sam-pipeline')}-{sha}", f"{version('sam-pipeline')}-{sha}-dirty")


def test_default_version_marks_uncommitted_changes(tmp_path):
    def git(*argv):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *argv],
                       check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "one")
    clean = kfp_client.default_version_name(tmp_path)
    assert clean.startswith(version("sam-pipeline") + "-") and not clean.endswith("-dirty")
    (tmp_path / "f.txt").write_text("b")
    assert kfp_client.default_version_name(tmp_path) == clean + "-dirty"
    with pytest.raises(kfp_client.UsageError, match="not a git checkout"):
        kfp_client.default_version_name(tmp_path / "nowhere")


def test_submit_and_schedule_an_uploaded_version(kfp_api, capsys):
    host, world = kfp_api
    for v in ("v1", "v2"):
        assert run_cli(capsys, "upload", "--host", host, "--version", v)[0] == 0
    pipeline_id = world["pipelines"][0]["pipeline_id"]
    v1, v2 = (v["pipeline_version_id"] for v in world["versions"])
    code, _, err = run_cli(capsys, "submit", "--host", host, "--pipeline", "sam-finetune", "-p", "n_iterations=7")
    assert code == 0, err
    code, _, err = run_cli(capsys, "schedule", "--host", host, "--pipeline", "sam-finetune",
                           "--pipeline-version", "v1", "--every", "1d")
    assert code == 0, err
    (run,) = _posted(world, "/apis/v2beta1/runs")
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline_id, "pipeline_version_id": v2}  # newest
    assert "pipeline_spec" not in run and run["runtime_config"]["parameters"] == {"n_iterations": 7}
    (rr,) = world["recurring_runs"]
    assert rr["pipeline_version_reference"] == {"pipeline_id": pipeline_id, "pipeline_version_id": v1}

    # parameters are checked against the uploaded version's spec, versions and pipelines must exist
    code, _, err = run_cli(capsys, "submit", "--host", host, "--pipeline", "sam-finetune", "-p", "bogus=1")
    assert code == 2 and "-p bogus: not a parameter of pipeline 'sam-finetune'" in err
    code, _, err = run_cli(capsys, "submit", "--host", host, "--pipeline", "sam-finetune", "--pipeline-version", "v9")
    _one_line_error(err, "has no version 'v9'")
    code, _, err = run_cli(capsys, "submit", "--host", host, "--pipeline", "nope")
    _one_line_error(err, "no pipeline 'nope' on")
    code, _, err = run_cli(capsys, "submit", "--host", host, "--pipeline-version", "v1")
    assert code == 2 and "--pipeline-version needs --pipeline" in err
