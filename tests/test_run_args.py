"""`pipelines/run_args.py`: the `run` command's summary lines, and the CLI's defaults that come from elsewhere."""
from __future__ import annotations

import io
from pathlib import Path

from components.eval_metrics import CHAMPION_BOX_DICE, FINETUNED_BOX_DICE, ZERO_SHOT_BOX_DICE, verdict_lines
from pipelines.run_args import failure_line, print_summary


def _summary(register_state: str, **extra) -> dict:
    tasks = {"fetch-weights": {"state": "SUCCEEDED", "seconds": 1.25}, "evaluate": {"state": "SUCCEEDED"},
             "register-model": {"state": register_state}}
    if register_state == "SKIPPED":  # the local runner's task states give every skip its gate's reason
        tasks["register-model"]["reason"] = "the fine-tuned model did not beat the bar"
    return {"tasks": tasks, "log": "/tmp/run.log", **extra}


def test_summary_prints_the_verdict_with_its_intervals_and_the_reason_once():
    reason = "box Dice gain over zero-shot +0.0100 [-0.0200, +0.0400]: the interval's lower end is not above margin 0.01"
    metrics = {FINETUNED_BOX_DICE: 0.61234, ZERO_SHOT_BOX_DICE: 0.5, CHAMPION_BOX_DICE: None, "margin": 0.01,
               "passed": False, "gain_box_dice_vs_zero_shot": 0.01, "gain_box_dice_vs_zero_shot_low": -0.02,
               "gain_box_dice_vs_zero_shot_high": 0.04, "gain_point_dice_vs_zero_shot": 0.0,
               "gain_point_dice_vs_zero_shot_low": -0.05, "gain_point_dice_vs_zero_shot_high": 0.05,
               "gain_vs_zero_shot_images": 25, "verdict": f"not passed: {reason}"}
    out = io.StringIO()
    print_summary(_summary("SKIPPED", metrics=metrics, passed=False), margin=0.5, model_name="m",
                  summary_json=Path("s.json"), out=out)
    lines = out.getvalue().splitlines()
    # The evaluation's own margin and verdict win over the run's flags.
    assert [f"  {line}" for line in verdict_lines(metrics)] == lines[5:8]
    assert lines[6] == ("  gain over zero-shot, 95 % interval: box +0.0100 [-0.0200, +0.0400], "
                        "point +0.0000 [-0.0500, +0.0500] (25 images)")
    assert lines[7] == f"  margin 0.01: not passed: {reason}"
    assert "  fetch-weights   SUCCEEDED 1.2s" in lines and "  evaluate        SUCCEEDED" in lines
    assert "  register-model skipped" in lines and out.getvalue().count(reason) == 1
    assert lines[-2:] == ["  full log: /tmp/run.log", "  summary: s.json"]


def test_summary_without_a_recorded_margin_uses_the_runs():
    metrics = {FINETUNED_BOX_DICE: 0.7, ZERO_SHOT_BOX_DICE: 0.6}
    out = io.StringIO()
    print_summary(_summary("SUCCEEDED", metrics=metrics, passed=True,
                           registered={"version": "v3", "model_uri": "s3://b/m/v3/model.pt"}),
                  margin=0.05, model_name="sam-demo", summary_json=None, out=out)
    text = out.getvalue()
    assert "\n".join(verdict_lines({**metrics, "margin": 0.05, "passed": True})) in text.replace("\n  ", "\n")
    assert "registered sam-demo v3: s3://b/m/v3/model.pt" in text and "summary:" not in text


def test_no_box_dice_line_before_evaluate_ran():
    out = io.StringIO()
    print_summary(_summary("NOT_RUN"), margin=0.0, model_name="m", summary_json=None, out=out)
    assert "box Dice" not in out.getvalue() and "skipped" not in out.getvalue()


def test_failure_line_names_the_first_failed_task_and_its_error():
    summary = _summary("NOT_RUN")
    summary["tasks"]["evaluate"] = {"state": "FAILED", "error": "EvaluationError: no test split"}
    assert failure_line(summary, Path("s.json")) == (
        "pipeline failed at evaluate (EvaluationError: no test split); full log in /tmp/run.log; summary in s.json")
    summary["tasks"]["evaluate"] = {"state": "NOT_RUN"}
    assert failure_line(summary, None) == "pipeline failed at an unknown task; full log in /tmp/run.log"


def test_fetch_weights_default_model_type_is_trainconfigs():
    from components.training.config import TrainConfig
    from pipelines.cli import build_parser

    assert build_parser().parse_args(["fetch-weights"]).model_type == TrainConfig().model_type
