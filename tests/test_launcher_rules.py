"""The model of the KFP 2.17 launcher and driver (tests/kfp_launcher_rules.py) covers the whole compiled
pipeline: outputs of tasks in nested sub-DAGs are type-checked, and every task's arguments are held to
Linux's single-argument limit. Contract tests: the rules are upstream's (kubeflow/pipelines 2.17.0
backend/src/v2/driver/resolve.go, driver/driver.go, metadata/converter.go), run on hand-made executor outputs."""
from __future__ import annotations

import json

import pytest
from kfp_launcher_rules import ARG_BUDGET, check_run, executor_inputs, output_parameter_types

from pipelines.sam_finetune import DEFAULT_YAML


def _out(run_dir, task, parameters=None, artifacts=None, loop_iteration=None):
    folder = run_dir / (f"for-loop-2-iteration-{loop_iteration}" if loop_iteration is not None else "") / task
    folder.mkdir(parents=True)
    arts = {k: {"artifacts": [{"name": k, "uri": f"file://{folder}/{k}", "metadata": m}]}
            for k, m in (artifacts or {}).items()}
    (folder / "executor_output.json").write_text(json.dumps({"parameterValues": parameters or {}, "artifacts": arts}))


def _good_run(run_dir):
    _out(run_dir, "fetch-weights", {"sha256": "ab"}, {"weights": {"sha256": "ab"}})
    _out(run_dir, "ingest-dataset", {}, {"dataset": {"content_hash": "cd"}})
    _out(run_dir, "check-changes", {"changed": True, "reason": "new data"})
    _out(run_dir, "embed-shards", {"Output": [0, 1]})
    for i in (0, 1):
        _out(run_dir, "embed", {}, {"index": {"shard": i, "failed": 0}}, loop_iteration=i)
    _out(run_dir, "finetune", {}, {"model": {"best_val_dice": 0.5}, "metrics": {}, "report": {}})
    _out(run_dir, "evaluate", {"passed": True, "finetuned_box_dice": 0.6, "zero_shot_box_dice": 0.4,
                               "metrics_json": "{}"}, {"metrics": {}, "report": {}})
    _out(run_dir, "register-model", {"version": "v1", "model_uri": "s3://b/m"})


def test_every_task_in_every_sub_dag_has_its_output_types():
    types = output_parameter_types(DEFAULT_YAML)
    # evaluate sits in dsl.If(changed), register-model in dsl.If(passed) inside it, embed in a dsl.ParallelFor.
    assert types["evaluate"]["passed"] == "BOOLEAN" and types["evaluate"]["finetuned_box_dice"] == "NUMBER_DOUBLE"
    assert types["register-model"] == {"version": "STRING", "model_uri": "STRING"}
    assert types["embed-shards"] == {"Output": "LIST"} and "embed" in types


def test_a_good_run_passes(tmp_path):
    _good_run(tmp_path)
    assert check_run(tmp_path, DEFAULT_YAML) == 9


@pytest.mark.parametrize("task,name,value,needle", [
    ("evaluate", "passed", "true", "'passed' is 'true', not a BOOLEAN"),             # one dsl.If deep
    ("evaluate", "finetuned_box_dice", None, "got null for input parameter"),
    ("register-model", "version", None, "a STRING consumer gets \"\""),               # two dsl.If deep
    ("embed-shards", "Output", "0,1", "'Output' is '0,1', not a LIST"),             # the ParallelFor's items
])
def test_a_broken_nested_output_type_fails_naming_it(tmp_path, task, name, value, needle):
    _good_run(tmp_path)
    path = tmp_path / task / "executor_output.json"
    data = json.loads(path.read_text())
    data["parameterValues"][name] = value
    path.write_text(json.dumps(data))
    with pytest.raises(AssertionError) as e:
        check_run(tmp_path, DEFAULT_YAML)
    assert f"{task}: output parameter " in str(e.value) and needle in str(e.value)


def test_executor_input_holds_the_real_values_and_the_collected_list(tmp_path):
    _good_run(tmp_path)
    inputs = executor_inputs(tmp_path, DEFAULT_YAML, {"model_name": "m"})
    assert set(inputs) == {"fetch-weights", "ingest-dataset", "check-changes", "embed-shards", "embed", "finetune",
                           "evaluate", "register-model"}
    finetune = inputs["finetune"]["inputs"]
    # dsl.Collected: both shards' index artifacts, with their metadata, resolved through the loop's sub-DAG.
    assert [a["metadata"]["shard"] for a in finetune["artifacts"]["embeddings"]["artifacts"]] == [0, 1]
    assert finetune["artifacts"]["dataset"]["artifacts"][0]["metadata"] == {"content_hash": "cd"}
    assert inputs["evaluate"]["inputs"]["parameterValues"]["model_name"] == "m"


def test_an_executor_input_over_the_single_argument_budget_fails(tmp_path):
    """Contract test of backend/src/v2/driver/driver.go (`"--executor_input", string(executorInputJSON)`):
    metadata a producer writes travels in every consumer's one argument."""
    _good_run(tmp_path)
    path = tmp_path / "ingest-dataset" / "executor_output.json"
    data = json.loads(path.read_text())
    data["artifacts"]["dataset"]["artifacts"][0]["metadata"]["items"] = ["x" * 100] * (ARG_BUDGET // 100)
    path.write_text(json.dumps(data))
    with pytest.raises(AssertionError) as e:
        check_run(tmp_path, DEFAULT_YAML)
    over = {line.split(":")[0] for line in str(e.value).splitlines()[1:]}
    assert {"embed", "finetune", "evaluate"} <= over and "fetch-weights" not in over
    assert "--executor_input is" in str(e.value) and "131072-byte single-argument limit" in str(e.value)


def test_the_most_embed_shards_allowed_fit_finetunes_argument(tmp_path):
    """MAX_EMBED_SHARDS index artifacts, with the metadata a real shard writes (components/steps.py embed_step),
    keep finetune's --executor_input under the budget; twice as many would not."""
    from components.steps import MAX_EMBED_SHARDS, shard_indices

    def run(folder, shards):
        _good_run(folder)
        for i in range(2, shards):
            meta = {"shard": i, "shards": shards, "failed": False, "images": 1700, "computed": 1700,
                    "from_store": 0, "encode_seconds": 1234.56, "weights_sha256": "a" * 64,
                    "dataset_content_hash": "b" * 64, "device": "cuda:0",
                    "embeddings_prefix": "s3://mlpipeline/sam-pipeline/embeddings/" + "a" * 64 + "/bf16/"}
            _out(folder, "embed", {}, {"index": meta}, loop_iteration=i)
        return folder

    assert check_run(run(tmp_path / "max", MAX_EMBED_SHARDS), DEFAULT_YAML) == 7 + MAX_EMBED_SHARDS
    with pytest.raises(AssertionError, match=r"finetune: --executor_input is \d+ bytes, over 65536"):
        check_run(run(tmp_path / "double", 2 * MAX_EMBED_SHARDS), DEFAULT_YAML)
    assert shard_indices(MAX_EMBED_SHARDS)[-1] == MAX_EMBED_SHARDS - 1
