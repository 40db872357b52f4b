"""A local run's tasks as KFP saw them: the DAG read from the compiled spec (nested dsl.If conditions and the
embed dsl.ParallelFor), and each task's state and outputs read from its executor output files, never from log
lines. `pipelines/local.py` runs the pipeline and asks this module what happened.
"""
from __future__ import annotations

import json
from pathlib import Path

from components.kfp_components import TASKS  # in topological order


def task_graph(pipeline) -> dict[str, dict]:
    """{task: {"after": upstream tasks, "gated": the tasks whose outputs decide, through dsl.If, whether it
    runs, "fan_out": the dsl.ParallelFor that runs it once per item, if any}} from the compiled spec: the one
    description of the DAG, so states can be told apart without reading log lines. Conditions nest
    (register-model sits in evaluate's dsl.If inside check-changes'), and the embed fan-out sits inside one."""
    import re

    spec = pipeline.pipeline_spec
    graph: dict[str, dict] = {}
    loops: dict[str, set] = {}

    def walk(dag, after: set, gated: tuple, loop: str | None) -> None:
        for name, task in dag.tasks.items():
            deps = after | set(task.dependent_tasks)
            gates = gated
            if task.trigger_policy.condition:
                channels = re.findall(r"pipelinechannel--[\w.-]+", task.trigger_policy.condition)
                producers = tuple(task.inputs.parameters[c].task_output_parameter.producer_task for c in channels
                                  if c in task.inputs.parameters)
                gates = gated + tuple(p for p in producers if p)
            inner = spec.components[task.component_ref.name].dag
            if inner.tasks:  # a dsl.If's or a dsl.ParallelFor's sub-DAG: its tasks wait for what it waits for
                walk(inner, deps, gates, name if task.WhichOneof("iterator") else loop)
            else:
                graph[name] = {"after": deps, "gated": gates}
                if loop:
                    graph[name]["fan_out"] = loop
                    loops.setdefault(loop, set()).add(name)

    walk(spec.root.dag, set(), (), None)
    for info in graph.values():  # waiting for a loop is waiting for the tasks it fans out
        for loop, subs in loops.items():
            if loop in info["after"]:
                info["after"] = (info["after"] - {loop}) | subs
    return graph


def task_states(graph: dict, run_dir: Path | None, gate_open: bool | None = None,
                gates: dict[str, tuple[bool | None, str]] | None = None) -> dict[str, dict]:
    """Each task's state and outputs, read from its executor output (written by kfp's executor only when the
    task's function returned): present means SUCCEEDED; absent behind a dsl.If whose deciding task said no
    means SKIPPED (with that gate's reason); absent with every upstream task succeeded means kfp ran it and it
    FAILED; otherwise it never ran. `gates`: {deciding task: (its verdict, the reason when no)};
    `gate_open` is evaluate's."""
    gates = {"evaluate": (gate_open, "evaluate.passed is false"), **(gates or {})}
    out = {name: _read_fan_out(graph, name, run_dir) if graph[name].get("fan_out") else _read_outputs(run_dir / name)
           for name in TASKS} if run_dir else dict.fromkeys(TASKS, {})
    states: dict[str, dict] = {}
    for name in TASKS:  # TASKS is in topological order
        info = {"state": "SUCCEEDED", **out[name]} if out[name] else {}
        if not info:
            closed = [gates[g][1] for g in graph[name]["gated"] if g in gates and gates[g][0] is False]
            blocked = [t for t in graph[name]["after"] if states.get(t, {}).get("state") != "SUCCEEDED"]
            if closed:
                info = {"state": "SKIPPED", "reason": closed[0]}
            elif blocked:
                info = {"state": "NOT_RUN", "reason": f"{', '.join(sorted(blocked))} did not succeed"}
            else:
                info = {"state": "FAILED"}
        states[name] = info
    return states


def gate_verdicts(run_dir: Path | None) -> dict[str, tuple[bool | None, str]]:
    """What each dsl.If's deciding task said, and why, from its outputs."""
    if run_dir is None:
        return {}
    check = _read_outputs(run_dir / "check-changes").get("parameters", {})
    ev = _read_outputs(run_dir / "evaluate").get("parameters", {})
    verdict = json.loads(ev.get("metrics_json") or "{}").get("verdict") or "not passed"
    return {"check-changes": (check.get("changed"), check.get("reason") or "nothing changed"),
            "evaluate": (ev.get("passed"), verdict)}


def _read_fan_out(graph: dict, name: str, run_dir: Path) -> dict:
    """A fanned-out task's outputs, one per iteration, or {} unless every iteration the loop's items asked
    for wrote one. kfp.local 2.17.3 runs dsl.ParallelFor and dsl.Collected itself, with no patch (upstream
    sdk/python/kfp/local/orchestrator/enhanced_dag_orchestrator.py, `_run_parallel_for_task`: iterations in
    parallel threads, iteration i's task in `<run>/<loop>-iteration-<i>/<task>/`)."""
    loop = graph[name]["fan_out"]
    items = None
    for producer in graph[name]["after"]:  # the task whose output list the loop iterates over
        values = _read_outputs(run_dir / producer).get("parameters", {}).get("Output")
        if isinstance(values, list):
            items = values
    dirs = sorted(run_dir.glob(f"{loop}-iteration-*"), key=lambda d: int(d.name.rsplit("-", 1)[1]))
    shards = [_read_outputs(d / name) for d in dirs]
    if items is None or len(shards) != len(items) or not all(shards):
        return {}
    return {"shards": shards}


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
