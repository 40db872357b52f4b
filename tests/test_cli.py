"""`sam-pipeline` commands other than `run`: compile, submit and schedule (against the KFP API stand-in of
tests/helpers.py; the rest of the KFP behaviour is in test_kfp_client.py), bad input, and the standalone
fetch-weights/ingest steps."""
from __future__ import annotations

import json

import pytest
import yaml

from pipelines.cli import main
from pipelines.kfp_client import parse_interval, validate_cron


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _posted(calls, path):
    return [body for method, p, body in calls if method == "POST" and p == path]


def test_submit_sends_the_package_and_typed_parameters(kfp_api, capsys):
    """Contract test: a stand-in for the KFP API server records what `submit` sends."""
    host, world = kfp_api
    calls = world["calls"]
    code, out, err = run_cli(capsys, "submit", "--host", host, "--experiment", "sam-exp", "-p", "n_iterations=50",
                             "-p", "debug_with_one_example=true", "-p", "margin=0.02", "-p", "device=cuda",
                             "--run-name", "nightly", "--wait")
    assert code == 0, err
    run_id = out.split()[1]
    assert f"run {run_id} ('nightly') created in experiment 'sam-exp'" in out
    assert f"ended SUCCEEDED: {host}/#/runs/details/{run_id}" in out
    assert ("GET", "/apis/v2beta1/healthz", {}) in calls
    (exp,) = _posted(calls, "/apis/v2beta1/experiments")
    assert exp["display_name"] == "sam-exp"
    (run,) = _posted(calls, "/apis/v2beta1/runs")
    assert run["display_name"] == "nightly" and run["experiment_id"] == world["experiments"][0]["experiment_id"]
    assert run["runtime_config"]["parameters"] == {"n_iterations": 50, "debug_with_one_example": True,
                                                   "margin": 0.02, "device": "cuda"}
    from pipelines.sam_finetune import DEFAULT_YAML

    committed = next(yaml.safe_load_all(DEFAULT_YAML.read_text()))
    assert run["pipeline_spec"]["pipeline_spec"] == json.loads(json.dumps(committed))
    assert "platform_spec" in run["pipeline_spec"]  # the kfp-kubernetes settings travel with it
    assert any(p == f"/apis/v2beta1/runs/{run_id}" for m, p, _ in calls if m == "GET")


def test_schedule_cron_is_a_recurring_run_without_catch_up(kfp_api, capsys):
    """Contract test: recurring run body as KFP v2beta1 expects it."""
    host, world = kfp_api
    code, out, err = run_cli(capsys, "schedule", "--host", host, "--cron", "0 0 3 * * *", "-p", "n_iterations=300")
    assert code == 0, err
    (rr,) = _posted(world["calls"], "/apis/v2beta1/recurringruns")
    assert rr["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert rr["max_concurrency"] == "1" or rr["max_concurrency"] == 1
    assert rr["no_catchup"] is True and rr["mode"] == "ENABLE"
    assert rr["experiment_id"] == world["experiments"][0]["experiment_id"]
    assert rr["runtime_config"]["parameters"] == {"n_iterations": 300}
    assert rr["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "sam-finetune"
    assert world["recurring_runs"][0]["recurring_run_id"] in out


def test_schedule_every_is_a_periodic_trigger(kfp_api, capsys):
    host, world = kfp_api
    assert run_cli(capsys, "schedule", "--host", host, "--every", "24h")[0] == 0
    (rr,) = _posted(world["calls"], "/apis/v2beta1/recurringruns")
    assert rr["trigger"]["periodic_schedule"]["interval_second"] in (86400, "86400")


@pytest.mark.parametrize("argv,needle", [
    (["run", "-m", "vit_x"], "invalid choice: 'vit_x'"),
    (["run", "-i", "-5"], "-5 must be >= 1"),
    (["run", "-g", "gpu0"], "is not a device"),
    (["schedule", "--host", "http://127.0.0.1:9", "--cron", "0 0 3 * *"], "has 5 fields; KFP needs 6"),
    (["schedule", "--host", "http://127.0.0.1:9", "--cron", "0 0 25 * * *"], "'25' is not a valid hour"),
    (["schedule", "--host", "http://127.0.0.1:9", "--every", "soon"], "use a duration like 24h"),
    (["submit", "--host", "localhost:8080"], "must start with http:// or https://"),
    (["submit", "--host", "http://127.0.0.1:9", "-p", "bogus=1"], "-p bogus: not a parameter"),
    (["submit", "--host", "http://127.0.0.1:9", "-p", "n_iterations=many"], "expected integer"),
    (["compile", "--tag", "bad tag"], "invalid image tag"),
    (["fetch-weights", "-m", "vit_q"], "invalid choice: 'vit_q'"),
])
def test_bad_input_is_one_line_and_non_zero(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and needle in err
    assert err.startswith("sam-pipeline") and err.count("\n") == 1 and "Traceback" not in err


def test_unreachable_host_is_one_line(capsys):
    from helpers import free_port

    code, _, err = run_cli(capsys, "submit", "--host", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "is unreachable" in err and err.count("\n") == 1


def test_cron_and_interval_parsing():
    for ok in ("0 0 3 * * *", "0 */15 * * * ?", "0 30 9 ? * MON-FRI", "0 0 0 1,15 JAN-JUN *"):
        assert validate_cron(ok) == ok
    assert parse_interval("1h30m") == 5400 and parse_interval("1d") == 86400


def test_compile_with_overrides(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    code, stdout, err = run_cli(capsys, "compile", "-o", str(out), "--registry", "registry.example:5000/ml",
                                "--tag", "2.0", "--gpu-node-selector", "gpu=yes", "--gpu-toleration", "gpu-only",
                                "--retries", "1")
    assert code == 0, err
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert "registry.example:5000/ml/sam-pipeline-finetune:2.0" in images and len(images) == 5
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-finetune"]
    assert k8s["nodeSelector"]["labels"] == {"gpu": "yes"}
    assert k8s["tolerations"] == [{"key": "gpu-only", "operator": "Exists", "effect": "NoSchedule"}]
    # finetune sits in check-changes' dsl.If (the `something-changed` condition's sub-DAG).
    inner = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert inner["finetune"]["retryPolicy"]["maxRetryCount"] == 1


def test_fetch_weights_and_ingest_alone(tmp_path, http_server, s3_env, capsys):
    import torch

    from components.datasets.synthetic import make_pennfudan_zip
    from components.hashing import sha256_file

    ckpt = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(3)}, ckpt)
    base = http_server(tmp_path)
    code, out, err = run_cli(capsys, "fetch-weights", "-m", "vit_t", "--url", f"{base}/w.pth",
                             "--sha256", sha256_file(ckpt), "--s3-endpoint", s3_env.endpoint,
                             "--prefix", s3_env.prefix)
    assert code == 0, err
    result = json.loads(out)
    assert result["sha256"] == sha256_file(ckpt) and result["object_uri"].startswith("s3://")

    make_pennfudan_zip(tmp_path / "pf.zip", n_fudan=3, n_penn=3, seed=0, size_range=(60, 90))
    code, out, err = run_cli(capsys, "ingest", "--source", str(tmp_path / "pf.zip"), "--s3-endpoint",
                             s3_env.endpoint, "--prefix", s3_env.prefix)
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 6 and result["manifest_uri"].endswith("manifest.json")

    code, _, err = run_cli(capsys, "ingest", "--source", str(tmp_path / "missing.zip"),
                           "--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix)
    assert code == 1 and err.startswith("sam-pipeline: error: ") and err.count("\n") == 1
