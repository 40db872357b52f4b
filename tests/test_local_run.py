"""The local runner's parts: task states from executor outputs, the console, the store the local runs of a
folder share and keep, the S3 server that dies with its parent, and the kfp.local patch that must go when kfp
fixes its bug."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import local, local_store, local_tasks
from pipelines.local_console import Console, Events

REPO = Path(__file__).resolve().parents[1]


# -- kfp.local's condition bug ------------------------------------------------------------------------

def test_kfp_local_still_misreads_task_outputs_in_conditions():
    """Upstream: kubeflow/pipelines sdk/python/kfp/local/orchestrator/enhanced_dag_orchestrator.py
    (`ConditionEvaluator._resolve_pipeline_channel`), fix proposed in kubeflow/pipelines#13313. When this test
    fails, the installed kfp resolves `evaluate.passed` itself: delete `local._fix_kfp_local_conditions`."""
    from kfp.local import io as kfp_io
    from kfp.local.orchestrator import enhanced_dag_orchestrator as dag

    store = kfp_io.IOStore()
    store.put_task_output("evaluate", "passed", True)
    resolve = dag.ConditionEvaluator._resolve_pipeline_channel
    upstream = getattr(resolve, "_original", resolve)
    assert upstream("pipelinechannel--evaluate-passed", store) is None, "kfp fixed it: remove the patch"
    local._fix_kfp_local_conditions()
    assert dag.ConditionEvaluator._resolve_pipeline_channel("pipelinechannel--evaluate-passed", store) is True


# -- task states from executor outputs -----------------------------------------------------------------

@pytest.fixture(scope="module")
def graph():
    from pipelines.sam_finetune import Placement, build_pipeline

    return local_tasks.task_graph(build_pipeline(Placement()))


def _succeed(run_dir: Path, task: str, **params) -> None:
    """An executor output as kfp's executor writes it (kfp/dsl/executor.py: parameterValues, artifacts)."""
    (run_dir / task).mkdir(parents=True, exist_ok=True)
    (run_dir / task / "executor_output.json").write_text(json.dumps({"parameterValues": params}))


def test_graph_is_read_from_the_compiled_spec(graph):
    assert graph["fetch-weights"] == {"after": set(), "gated": ()}
    assert graph["finetune"]["after"] == {"fetch-weights", "ingest-dataset", "check-changes", "embed"}
    assert graph["finetune"]["gated"] == graph["evaluate"]["gated"] == ("check-changes",)
    assert graph["embed"]["fan_out"].startswith("for-loop") and graph["embed"]["gated"] == ("check-changes",)
    assert graph["embed"]["after"] == {"fetch-weights", "ingest-dataset", "check-changes", "embed-shards"}
    assert graph["register-model"]["gated"] == ("check-changes", "evaluate")
    assert "evaluate" in graph["register-model"]["after"]


def test_states_when_nothing_changed(graph, tmp_path):
    for task in ("fetch-weights", "ingest-dataset"):
        _succeed(tmp_path, task)
    _succeed(tmp_path, "check-changes", changed=False, reason="nothing changed since m v1")
    states = local_tasks.task_states(graph, tmp_path, gates={"check-changes": (False, "nothing changed since m v1")})
    skipped = ("embed-shards", "embed", "finetune", "evaluate", "register-model")
    assert {t: states[t]["state"] for t in skipped} == dict.fromkeys(skipped, "SKIPPED")
    assert states["register-model"]["reason"] == "nothing changed since m v1"


def test_states_success_skip_failure_and_not_run(graph, tmp_path):
    for task in ("fetch-weights", "ingest-dataset", "finetune"):
        _succeed(tmp_path, task)
    _succeed(tmp_path, "check-changes", changed=True, reason="no registered version of m yet")
    _succeed(tmp_path, "embed-shards", Output=[0, 1])
    loop = graph["embed"]["fan_out"]
    _succeed(tmp_path / f"{loop}-iteration-0", "embed")
    # One of two shards left no output: the fan-out failed.
    assert local_tasks.task_states(graph, tmp_path, gate_open=None)["embed"]["state"] == "FAILED"
    _succeed(tmp_path / f"{loop}-iteration-1", "embed")
    _succeed(tmp_path, "evaluate", passed=False)
    states = local_tasks.task_states(graph, tmp_path, gate_open=False)
    assert {t: s["state"] for t, s in states.items()} == {
        "fetch-weights": "SUCCEEDED", "ingest-dataset": "SUCCEEDED", "check-changes": "SUCCEEDED",
        "embed-shards": "SUCCEEDED", "embed": "SUCCEEDED", "finetune": "SUCCEEDED", "evaluate": "SUCCEEDED",
        "register-model": "SKIPPED"}
    assert len(states["embed"]["shards"]) == 2
    assert states["evaluate"]["parameters"] == {"passed": False}

    # The gate was open and register-model left no output: it ran and failed.
    assert local_tasks.task_states(graph, tmp_path, gate_open=True)["register-model"]["state"] == "FAILED"

    # finetune started (kfp's executor made its folder) but never wrote its output.
    (tmp_path / "finetune" / "executor_output.json").unlink()
    (tmp_path / "evaluate" / "executor_output.json").unlink()
    states = local_tasks.task_states(graph, tmp_path, gate_open=None)
    assert states["finetune"]["state"] == "FAILED"
    assert states["evaluate"]["state"] == states["register-model"]["state"] == "NOT_RUN"
    assert "finetune" in states["evaluate"]["reason"]


# -- the console ---------------------------------------------------------------------------------------

def _kfp_record(console: Console, events: Events, message: str, created: float) -> None:
    """What kfp.local's task dispatcher logs (kfp/local/task_dispatcher.py), as the root logger delivers it."""
    import logging

    record = logging.LogRecord("root", logging.INFO, __file__, 0, message, None, None)
    record.created = created
    events.filter(record)
    console.write(f"12:00:00.000 - INFO - {message}\n")


def test_console_shows_task_lines_progress_and_the_error_and_logs_everything(tmp_path):
    out, log = io.StringIO(), io.StringIO()
    console = Console(out, log, progress_every=3600)
    events = Events(console)
    _kfp_record(console, events, "Executing task \x1b[96m'finetune'\x1b[0m", 100.0)
    console.write('{"inputs": {"parameterValues": {"lr": 1e-05}}}\n')  # the executor-input JSON
    console.write("UserWarning: Overwriting tiny_vit_5m_224 in registry\n")
    console.write("finetune:  20%|##        | 1/5 [00:01<00:04, 1.0it/s]\rfinetune:  40%|####      | 2/5 [00:02<00:03]\n")
    console.write("finetune:  60%|######    | 3/5 [00:03<00:02, 1.0it/s]\n")  # within progress_every: held
    console.write("finetune:  80%|########  | 4/5 [00:04<00:01, 1.0it/s]\n")  # held, shown at the end
    console.write("Traceback (most recent call last):\n  File \"x.py\", line 1\n")
    console.write("components.storage.StorageError: s3://b/k does not exist\n")
    _kfp_record(console, events, "Task \x1b[96m'finetune'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m", 112.5)

    shown = out.getvalue().splitlines()
    assert shown[0].split() == ["finetune", "started"]
    assert "40%" in shown[1] and "20%" not in shown[1]  # the last update of a piped bar
    assert "80%" in shown[2]  # where the bar stopped
    assert shown[3].startswith("finetune") and "FAILED in 12.5s" in shown[3]
    assert shown[3].endswith("StorageError: s3://b/k does not exist") and len(shown) == 4
    assert "parameterValues" in log.getvalue() and "Overwriting tiny_vit" in log.getvalue()
    assert events.seconds() == {"finetune": 12.5}
    assert console.error_line("finetune") == "StorageError: s3://b/k does not exist"


def test_a_run_leaves_the_root_loggers_handlers_as_it_found_them(tmp_path):
    """kfp.local restores the root logger's handlers around each task from what it saw when the task began; the
    tasks of a dsl.ParallelFor run in threads, so one can restore another's handler (bound to this run's console)
    for good (kfp/local/logging_utils.py, `local_logger_context`). After the run its log file is closed: a next
    run in the same process printed "--- Logging error ---" before its own error line. Here the pipeline leaks a
    handler the way the race does, and the run must not keep it."""
    import logging

    root = logging.getLogger()
    before = root.handlers[:]
    with open(tmp_path / "run.log", "w") as log:
        console = Console(io.StringIO(), log)

        def leaking_pipeline(**params):
            root.addHandler(logging.StreamHandler(sys.stdout))  # sys.stdout is the run's console here

        local._execute(leaking_pipeline, {}, tmp_path / "own", tmp_path / "workspace", {}, console)
    assert root.handlers == before
    logging.getLogger("after-the-run").warning("nothing may write to the closed log now")


def test_on_a_terminal_progress_is_one_line_redrawn_in_place():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    console = Console(out, io.StringIO())
    events = Events(console)
    _kfp_record(console, events, "Executing task 'ingest-dataset'", 0.0)
    for i in range(1, 4):
        console.write(f"upload penn-fudan:  {i * 25}%|##  | {i}/4 [00:0{i}<00:01]\n")
    _kfp_record(console, events, "Task 'ingest-dataset' finished with status SUCCESS", 3.0)
    lines = out.getvalue().split("\n")
    assert lines[0].split() == ["ingest-dataset", "started"]
    assert lines[1].count("\r\x1b[2K") == 4 and "75%" in lines[1]  # three redraws, then cleared
    assert lines[1].endswith("ingest-dataset  finished in 3.0s")


def test_verbose_console_passes_everything_through():
    out, log = io.StringIO(), io.StringIO()
    console = Console(out, log, verbose=True)
    console.write('{"inputs": {}}\nfinetune:  40%|####      | 2/5\n')
    assert out.getvalue() == log.getvalue() == '{"inputs": {}}\nfinetune:  40%|####      | 2/5\n'


# -- one store for all local runs in a folder, kept between them -------------------------------------------

def _server_ends(cfg) -> None:
    from components import s3server
    from helpers import wait_until

    assert wait_until(lambda: not s3server.is_up(cfg.endpoint), 30, every=0.3), "the shared server outlived its runs"


def test_the_folders_store_keeps_versions_across_servers_and_fresh_empties_it(tmp_path):
    """The registry needs nothing of its own: its versions are objects of the folder's store, which outlives its
    server; `--fresh` (shared_store(fresh=True)) empties it, but never under a run that is using it."""
    from components.errors import UserError
    from components.registry import ObjectStoreRegistry
    from components.storage import ObjectStore

    root, model = tmp_path / "out", tmp_path / "model.pt"
    for run in range(2):
        with local_store.shared_store(root, bucket="mlpipeline", prefix="p/") as cfg:
            reg = ObjectStoreRegistry(ObjectStore(cfg))
            model.write_bytes(f"weights of run {run}".encode())
            assert reg.register("sam-local", model, {"metrics": {"box_dice": 0.5 + run / 10}}).version == f"v{run + 1}"
        _server_ends(cfg)  # the next run starts a new server, from the folder
    with local_store.shared_store(root, bucket="mlpipeline", prefix="p/") as cfg:
        reg = ObjectStoreRegistry(ObjectStore(cfg))
        assert reg.latest("sam-local")["version"] == "v2" and reg.next_version("sam-local") == "v3"
        assert ObjectStore(cfg).get_bytes(reg.latest("sam-local")["model_uri"].split("/", 3)[3]) == b"weights of run 1"
        with pytest.raises(UserError, match="another run is using the store"):
            with local_store.shared_store(root, bucket="mlpipeline", prefix="p/", fresh=True):
                pass
    # The server of the last run may still be idling (its watchdog ends it within a second): fresh stops it too.
    with local_store.shared_store(root, bucket="mlpipeline", prefix="p/", fresh=True) as fresh:
        assert fresh.endpoint != cfg.endpoint
        assert ObjectStore(fresh).list("p/") == [] and ObjectStoreRegistry(ObjectStore(fresh)).next_version("sam-local") == "v1"
    assert not list(local_store.objects_folder(root).rglob("*"))


def test_fresh_with_a_store_of_ones_own_is_refused_in_one_line(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["run", "--demo", "--fresh", "--s3-endpoint", "127.0.0.1:9", "--pipeline-root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("sam-pipeline: error: --fresh empties the local store; with "
                                               "--s3-endpoint there is none")


# -- the S3 server dies with its parent ---------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, limit: float = 60.0) -> bool:
    from helpers import wait_until

    return wait_until(lambda: not _alive(pid), limit)


def _start_parent(script: str, cwd: Path) -> tuple[subprocess.Popen, int]:
    """A real process that starts the embedded server and blocks; returns it and the server's pid."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = parent.stdout.readline()
    assert line.startswith("up"), line
    servers = _children(parent.pid)
    assert len(servers) == 1
    return parent, servers[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
@pytest.mark.parametrize("mechanism", ["pdeathsig", "watchdog"])
def test_embedded_server_dies_when_its_parent_is_killed(mechanism, tmp_path):
    disable = {"pdeathsig": "s3server.WATCHDOG_SECONDS = 3600",  # only the kernel's signal can end it
               "watchdog": "s3server._die_with_parent = lambda: None"}[mechanism]  # no preexec_fn
    parent, server = _start_parent(f"""
        import time
        from components import s3server
        {disable}
        with s3server.embedded_s3():
            print("up", flush=True)
            time.sleep(600)
    """, tmp_path)
    try:
        assert _alive(server)
        parent.send_signal(signal.SIGKILL)  # no cleanup runs in the parent
        parent.wait()
        assert _wait_gone(server), f"S3 server {server} outlived its SIGKILLed parent ({mechanism})"
    finally:
        if _alive(server):
            os.kill(server, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_sigterm_during_a_run_stops_the_server_through_the_cleanup(tmp_path):
    # Both parent-death mechanisms off: only the run's SIGTERM handler and its `finally` can stop the server.
    # The sources need only exist: run_local, which would read them, is the stand-in below.
    (tmp_path / "data.zip").touch()
    (tmp_path / "weights.pth").touch()
    parent, server = _start_parent("""
        import sys, time
        from components import s3server
        from pipelines import cli, local
        s3server.WATCHDOG_SECONDS = 3600
        s3server._die_with_parent = lambda: None

        def run_local(*args, **kwargs):
            with s3server.embedded_s3():
                print("up", flush=True)
                time.sleep(600)

        local.run_local = run_local
        sys.exit(cli.main(["run", "-g", "cpu", "--dataset-source", "data.zip", "--weights-url", "weights.pth"]))
    """, tmp_path)
    try:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 130  # "interrupted": the handler ran, not the default kill
        assert not _alive(server)
    finally:
        if _alive(server):
            os.kill(server, signal.SIGKILL)


# -- a failed task through the real kfp.local ------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_task_is_named_with_its_error_and_the_console_stays_readable(http_server, s3_env, tmp_path,
                                                                               monkeypatch, capsys):
    from components.datasets.synthetic import make_pennfudan_zip
    from pipelines.cli import main

    make_pennfudan_zip(tmp_path / "pf.zip", n_fudan=3, n_penn=3, seed=0, size_range=(48, 64))
    (tmp_path / "w.pth").write_bytes(b"not the weights you pinned")
    base = http_server(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "-g", "cpu", "--dataset-source", f"{base}/pf.zip", "--weights-url", f"{base}/w.pth",
                 "--weights-sha256", "0" * 64, "--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix,
                 "--summary-json", str(tmp_path / "summary.json")])
    out, err = capsys.readouterr()
    summary = json.loads((tmp_path / "summary.json").read_text())
    states = {t: i["state"] for t, i in summary["tasks"].items()}
    assert code == 1 and states["fetch-weights"] == "FAILED" and states["ingest-dataset"] == "SUCCEEDED"
    assert states["finetune"] == states["evaluate"] == states["register-model"] == "NOT_RUN"
    assert "did not beat the bar" not in out + err
    error = summary["tasks"]["fetch-weights"]["error"]
    assert "sha256" in error and error in err and "fetch-weights" in err and err.count("\n") == 1, err
    # The console: task lines, not kfp.local's executor input; that is in the log file it names.
    assert "executorInput" not in out and "parameterValues" not in out
    assert any(line.startswith("ingest-dataset") and "finished in" in line for line in out.splitlines())
    log = Path(summary["log"]).read_text()
    assert summary["log"] in out and "parameterValues" in log and "Overwriting tiny_vit" not in log


def test_old_runs_and_their_logs_are_pruned_but_not_the_store(tmp_path):
    from pipelines.sam_finetune import PIPELINE_NAME

    (tmp_path / "logs").mkdir()
    (local_store.objects_folder(tmp_path) / "ab").mkdir(parents=True)
    for i in range(7):
        (tmp_path / f"{PIPELINE_NAME}-2026-01-0{i + 1}").mkdir()
        log = tmp_path / "logs" / f"run-2026010{i + 1}.log"
        log.write_text("x")
        os.utime(log, (1000 + i, 1000 + i))
    local.remove_old_runs(tmp_path, keep=5)
    assert sorted(p.name for p in tmp_path.glob(f"{PIPELINE_NAME}-*"))[0].endswith("01-03")
    assert len(list(tmp_path.glob(f"{PIPELINE_NAME}-*"))) == 5
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"run-2026010{i}.log" for i in range(3, 8)]
    assert (local_store.objects_folder(tmp_path) / "ab").is_dir()


def test_runs_in_one_folder_share_one_server_that_ends_with_the_last(tmp_path):
    """The shared store: a second run finds the first's server; another server on the recorded port (a port
    reused after the folder's server ended) is not taken for it; the server ends once no run holds it."""
    from components import s3server

    root = tmp_path / "out"
    with local_store.shared_store(root, bucket="mlpipeline", prefix="p/") as first:
        with local_store.shared_store(root, bucket="mlpipeline", prefix="p/") as second:
            assert second.endpoint == first.endpoint
    from helpers import wait_until

    assert wait_until(lambda: not s3server.is_up(first.endpoint), 30, every=0.3), \
        "the shared server outlived its last run"
    with s3server.embedded_s3() as stranger:  # a server of someone else, where server.json points
        doc = json.loads((root / "store" / "server.json").read_text())
        (root / "store" / "server.json").write_text(json.dumps({**doc, "endpoint": stranger.endpoint}))
        with local_store.shared_store(root, bucket="mlpipeline", prefix="p/") as third:
            assert third.endpoint != stranger.endpoint
