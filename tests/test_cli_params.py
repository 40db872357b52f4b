"""`submit` and `schedule` check `-p` values with `run`'s rules (run_args.validate_run_params and
TrainConfig.validate) before anything is sent. Contract tests: the KFP API stand-in records every call."""
from __future__ import annotations

import pytest

from pipelines.cli import EXIT_USAGE, main


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--every", "24h"]])
@pytest.mark.parametrize("param, needle", [
    ("lr=nan", "-p lr nan: must be a finite number"),
    ("margin=inf", "-p margin inf: must be a finite number"),
    ("n_iterations=0", "n_iterations must be >= 1 (got 0)"),
    ("checkpoint_name=../x", "checkpoint_name must be one folder name"),
    ("seed=-1", "seed must be >= 0 (got -1)"),
    ("model_name=../x", "-p model_name: "),
    ("bucket=my..bucket", "-p bucket: "),
    ("model_type=vit_q", "model_type must be"),
    ("bogus=1", "-p bogus: not a parameter of sam_finetune.yaml (known: "),
])
def test_what_run_refuses_is_not_sent(command, param, needle, kfp_api, capsys):
    host, world = kfp_api
    code = main([*command, "--host", host, "-p", "n_iterations=5", "-p", param])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and needle in err and err.count("\n") == 1, err
    assert not [c for c in world["calls"] if c[0] != "GET"], world["calls"]  # nothing created


def test_unknown_parameter_lists_the_known_ones(kfp_api, capsys):
    host, _ = kfp_api
    main(["submit", "--host", host, "-p", "learning_rate=0.1"])
    err = capsys.readouterr().err
    assert "known: " in err and " lr," in err and "n_iterations" in err
