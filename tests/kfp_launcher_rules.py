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
  (`backend/src/v2/driver/resolve.go`): a null reaches them as an absent value, and a value of another
  kind than the parameter's declared `parameterType` is not what the consumer's signature reads.

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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (protojson rejects it)")


def _problems_in_value(where: str, value, *, top: bool) -> list[str]:
    if value is None:
        return [f"{where} is null: StructValueToMLMDValue has no case for null" if top else f"{where} is null"]
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
        found = _problems_in_value(where, value, top=False)
        declared = (parameter_types or {}).get(name)
        if not found and declared:
            kinds = _PARAMETER_KINDS[declared]
            bad_kind = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
            if bad_kind or (declared == "NUMBER_INTEGER" and value != int(value)):
                found = [f"{where} is {value!r}, not a {declared}"]
        problems += found
    return problems


def output_parameter_types(pipeline_yaml: Path) -> dict[str, dict[str, str]]:
    """{task name: {output parameter: parameterType}} from a compiled pipeline spec."""
    spec = next(yaml.safe_load_all(Path(pipeline_yaml).read_text()))  # the platform spec follows it
    out = {}
    for task, body in spec["root"]["dag"]["tasks"].items():
        component = spec["components"][body["componentRef"]["name"]]
        params = component.get("outputDefinitions", {}).get("parameters", {})
        out[task] = {name: p["parameterType"] for name, p in params.items()}
    return out


def check_run(run_dir: Path, pipeline_yaml: Path) -> int:
    """Assert that every task's executor output under `run_dir` passes; returns how many were checked."""
    types = output_parameter_types(pipeline_yaml)
    problems, checked = [], 0
    # `**`: kfp.local runs a dsl.ParallelFor's iterations in <run>/<loop>-iteration-<i>/<task>/.
    for path in sorted(Path(run_dir).glob("**/executor_output.json")):
        task = path.parent.name
        problems += check_executor_output(task, path.read_text(), types.get(task))
        checked += 1
    assert checked, f"no executor_output.json under {run_dir}"
    assert not problems, "a KFP 2.17 backend would reject this run:\n" + "\n".join(problems)
    return checked
