"""What a KFP 2.17 backend accepts from a task, applied to the executor outputs of a local run.

kfp.local keeps a component's outputs in `executor_output.json` and is lenient; the 2.17 launcher is not.
These are its rules, read from kubeflow/pipelines at tag 2.17.0 (the same at HEAD, 2026-08):

- `backend/src/v2/component/launcher_v2.go` reads the executor output with protojson into an
  `ExecutorOutput`: the file must be strict JSON, so NaN and infinities (which Python's json writes)
  do not parse.
- For every output artifact it calls `RecordArtifact`, which turns each top-level metadata field into an
  ML Metadata custom property with `StructValueToMLMDValue` (`backend/src/v2/metadata/converter.go`):
  string, number, bool (stored as an int), list and struct are accepted; null has no case
  (`// TODO: support null`) and the launcher fails the task with
  `unable to produce MLMD artifact for output "<name>"`.
- Output parameters are published with the execution and resolved for the consumers by the driver
  (`backend/src/v2/driver/resolve.go`, `resolveInputs`): a null reaching a STRING input is turned into text
  by `metadata.PbValueToText`, which makes it `""` (the consumer cannot tell it from an empty string); for
  any other type the driver fails the consumer with `got null for input parameter`. A value of another kind
  than the consumer's `parameterType` fails it with `input parameter ... type mismatch` (only STRING inputs
  take any kind, as its JSON text). Both are checked against the producer's declared type, in every
  sub-DAG (dsl.If, dsl.ParallelFor), not only the root's.
- The driver hands each task its whole executor input as ONE command-line argument
  (`backend/src/v2/driver/driver.go`, `"--executor_input", string(executorInputJSON)`, and the launcher
  substitutes it again for `{{$}}` in the component's own arguments, `component/launcher_v2.go`), next to
  `--component_spec`. Linux refuses a single argument over MAX_ARG_STRLEN (32 pages: 128 KiB) with E2BIG,
  before the pod's process starts. `check_run` rebuilds every task's executor input from the run's real
  values (input artifacts with their metadata, parameters, outputs) and requires half of that limit.

`check_run` applies them to every task of a local run and fails naming the task, the output and the key.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

# parameterType -> the Python kinds of a JSON value the consumer can read as that type.
_PARAMETER_KINDS = {
    "STRING": (str,),
    "NUMBER_DOUBLE": (int, float),
    "NUMBER_INTEGER": (int, float),
    "BOOLEAN": (bool,),
    "LIST": (list,),
    "STRUCT": (dict,),
}
_MLMD_KINDS = (str, int, float, bool, list, dict)
MAX_ARG_STRLEN = 128 * 1024          # linux/binfmts.h: PAGE_SIZE * 32
ARG_BUDGET = MAX_ARG_STRLEN // 2     # headroom: longer object URIs, longer run ids, more metadata
# A real artifact URI is longer than kfp.local's file path: minio://<bucket>/v2/artifacts/<pipeline>/<run uuid>/
# <task>/<execution uuid>/<output>; this stand-in is longer still, so the estimate errs on the large side.
_URI = "minio://mlpipeline/v2/artifacts/sam-finetune/" + "0" * 36 + "/{task}/" + "0" * 36 + "/{name}" + "x" * 40


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (protojson rejects it)")


def _problems_in_value(where: str, value, *, top: bool, declared: str | None = None) -> list[str]:
    if value is None:
        if top:
            return [f"{where} is null: StructValueToMLMDValue has no case for null"]
        if declared == "STRING":
            return [f"{where} is null: a STRING consumer gets \"\" (PbValueToText), not an absent value"]
        return [f"{where} is null: the driver fails its consumer (got null for input parameter)"]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where} is {value}: not JSON"]
    if not isinstance(value, _MLMD_KINDS):
        return [f"{where} is a {type(value).__name__}: not a protobuf Value"]
    return []


def check_executor_output(task: str, text: str, parameter_types: dict[str, str] | None = None) -> list[str]:
    """The problems a 2.17 launcher would have with one task's executor_output.json text."""
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        return [f"{task}: executor_output.json: {e}"]
    problems = []
    for output, entry in (data.get("artifacts") or {}).items():
        for artifact in entry.get("artifacts", []):
            for key, value in (artifact.get("metadata") or {}).items():
                problems += _problems_in_value(f"{task}: artifact {output!r} metadata {key!r}", value, top=True)
    for name, value in (data.get("parameterValues") or {}).items():
        where = f"{task}: output parameter {name!r}"
        declared = (parameter_types or {}).get(name)
        found = _problems_in_value(where, value, top=False, declared=declared)
        if not found and declared:
            kinds = _PARAMETER_KINDS[declared]
            bad_kind = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
            if bad_kind or (declared == "NUMBER_INTEGER" and value != int(value)):
                found = [f"{where} is {value!r}, not a {declared}"]
        problems += found
    return problems


def load_spec(pipeline_yaml: Path) -> dict:
    return next(yaml.safe_load_all(Path(pipeline_yaml).read_text()))  # the platform spec follows it


def walk_tasks(spec: dict):
    """(task name, task spec, its component spec, the component spec of the DAG that holds it) for every task
    of every DAG, sub-DAGs (dsl.If, dsl.ParallelFor, dsl.ExitHandler) included, parents before children."""
    def walk(dag_component: dict):
        for name, body in sorted(dag_component["dag"]["tasks"].items()):
            component = spec["components"][body["componentRef"]["name"]]
            yield name, body, component, dag_component
            if "dag" in component:
                yield from walk(component)

    yield from walk(spec["root"])


def output_parameter_types(pipeline_yaml: Path) -> dict[str, dict[str, str]]:
    """{task name: {output parameter: parameterType}} for every container task of a compiled pipeline spec,
    however deep in sub-DAGs (task names are unique across a KFP pipeline's DAGs)."""
    out = {}
    for task, _, component, _ in walk_tasks(load_spec(pipeline_yaml)):
        if "dag" not in component:
            params = component.get("outputDefinitions", {}).get("parameters", {})
            out[task] = {name: p["parameterType"] for name, p in params.items()}
    return out


def _outputs_by_task(run_dir: Path) -> dict[str, list[dict]]:
    """{task: [executor output, one per run of it]} (a dsl.ParallelFor's iterations each add one)."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(Path(run_dir).glob("**/executor_output.json")):
        runs.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    return runs


def _producer_artifacts(spec: dict, dag_component: dict, producer: str, key: str, runs: dict) -> list[dict]:
    """The runtime artifacts a task's output (or a sub-DAG's collected output) hands on, with metadata."""
    component = spec["components"][dag_component["dag"]["tasks"][producer]["componentRef"]["name"]]
    if "dag" in component:  # dsl.Collected: the loop body's task, every iteration
        selectors = component["dag"]["outputs"]["artifacts"][key]["artifactSelectors"]
        return [a for s in selectors for a in _producer_artifacts(spec, component, s["producerSubtask"],
                                                                   s["outputArtifactKey"], runs)]
    out = []
    for run in runs.get(producer, []):
        for art in (run.get("artifacts") or {}).get(key, {}).get("artifacts", []):
            out.append({"name": "1" * 8, "type": {"schemaTitle": "system.Artifact", "schemaVersion": "0.0.1"},
                        "uri": _URI.format(task=producer, name=key), "metadata": art.get("metadata") or {}})
    return out


def executor_inputs(run_dir: Path, pipeline_yaml: Path, parameters: dict | None = None) -> dict[str, dict]:
    """{task: the largest executor input the 2.17 driver would build for it} from a local run's real values:
    its input parameters, its input artifacts with their producers' metadata, and its outputs' URIs and files.
    `parameters`: the run's pipeline parameters (default: the compiled defaults)."""
    spec, runs = load_spec(pipeline_yaml), _outputs_by_task(run_dir)
    root_inputs = {k: v.get("defaultValue", "") for k, v in
                   spec["root"].get("inputDefinitions", {}).get("parameters", {}).items()}
    scopes: dict[int, dict] = {id(spec["root"]): {**root_inputs, **(parameters or {})}}  # DAG -> its inputs
    out = {}
    for task, body, component, dag in walk_tasks(spec):
        scope = scopes[id(dag)]
        values: dict = {}
        for name, ref in body.get("inputs", {}).get("parameters", {}).items():
            if "taskOutputParameter" in ref:
                src = ref["taskOutputParameter"]
                found = [r.get("parameterValues", {}).get(src["outputParameterKey"])
                         for r in runs.get(src["producerTask"], [])]
                values[name] = found[0] if found else ""
            elif "runtimeValue" in ref:
                values[name] = ref["runtimeValue"].get("constant")
            else:
                values[name] = scope.get(ref.get("componentInputParameter"), 0)  # 0: a loop item
        for name, ref in body.get("inputs", {}).get("artifacts", {}).items():
            if "taskOutputArtifact" in ref:
                src = ref["taskOutputArtifact"]
                values[name] = _producer_artifacts(spec, dag, src["producerTask"], src["outputArtifactKey"], runs)
            else:
                values[name] = scope.get(ref.get("componentInputArtifact"), [])
        if "dag" in component:
            scopes[id(component)] = values
        elif task in runs:
            out[task] = _executor_input(task, component, values)
    return out


def _executor_input(task: str, component: dict, values: dict) -> dict:
    artifacts = set(component.get("inputDefinitions", {}).get("artifacts", {}))
    outputs = component.get("outputDefinitions", {})
    return {
        "inputs": {"parameterValues": {k: v for k, v in values.items() if k not in artifacts},
                   "artifacts": {k: {"artifacts": v} for k, v in values.items() if k in artifacts}},
        "outputs": {
            "parameters": {k: {"outputFile": f"/tmp/kfp/outputs/{k}"} for k in outputs.get("parameters", {})},
            "artifacts": {k: {"artifacts": [{"name": k, "type": {"schemaTitle": a["artifactType"]["schemaTitle"]},
                                             "uri": _URI.format(task=task, name=k)}]}
                          for k, a in outputs.get("artifacts", {}).items()},
            "outputFile": "/tmp/kfp_outputs/output_metadata.json"},
    }


def argument_problems(run_dir: Path, pipeline_yaml: Path, parameters: dict | None = None) -> list[str]:
    """Every single argument the driver passes over ARG_BUDGET: each task's executor input, its component spec
    (`--component_spec`) and each element of its command and args (the component's source is one of them)."""
    spec = load_spec(pipeline_yaml)
    problems = []
    for task, size in sorted((t, len(json.dumps(e, separators=(",", ":"))))
                             for t, e in executor_inputs(run_dir, pipeline_yaml, parameters).items()):
        if size > ARG_BUDGET:
            problems.append(f"{task}: --executor_input is {size} bytes, over {ARG_BUDGET} (half of Linux's "
                            f"{MAX_ARG_STRLEN}-byte single-argument limit)")
    for task, body, component, _ in walk_tasks(spec):
        if "dag" in component:
            continue
        container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        args = [("--component_spec", json.dumps(component, separators=(",", ":")))]
        args += [("command/args", a) for a in container.get("command", []) + container.get("args", [])]
        problems += [f"{task}: {what} is {len(a)} bytes, over {ARG_BUDGET}" for what, a in args if len(a) > ARG_BUDGET]
    return problems


def check_run(run_dir: Path, pipeline_yaml: Path, parameters: dict | None = None) -> int:
    """Assert that every task's executor output under `run_dir` passes, and that every task's arguments fit on
    a Linux command line; returns how many executor outputs were checked."""
    types = output_parameter_types(pipeline_yaml)
    problems, checked = [], 0
    # `**`: kfp.local runs a dsl.ParallelFor's iterations in <run>/<loop>-iteration-<i>/<task>/.
    for path in sorted(Path(run_dir).glob("**/executor_output.json")):
        task = path.parent.name
        problems += check_executor_output(task, path.read_text(), types.get(task))
        checked += 1
    assert checked, f"no executor_output.json under {run_dir}"
    problems += argument_problems(run_dir, pipeline_yaml, parameters)
    assert not problems, "a KFP 2.17 backend would reject this run:\n" + "\n".join(problems)
    return checked
