"""The CLI's error contract: a `UserError` is one line (or one line per problem) and a non-zero exit; anything
else is a bug and keeps its traceback; `run` checks every parameter before any work starts."""
from __future__ import annotations

import pytest

from pipelines import cli
from pipelines.cli import main


def test_ingest_of_a_bad_dataset_shows_every_problem_naming_its_file(tmp_path, s3_env, capsys):
    from PIL import Image

    from components.datasets.synthetic import make_pennfudan

    root = make_pennfudan(tmp_path / "data", n_fudan=2, n_penn=2, seed=0, size_range=(48, 64))
    masks = sorted((root / "PedMasks").iterdir())
    masks[0].unlink()  # an image without its mask
    masks[1].write_bytes(b"not a png")  # a corrupt mask
    with Image.open(root / "PNGImages" / masks[2].name.replace("_mask", "")) as im:
        Image.new("RGB", im.size).save(masks[2])  # an RGB mask of the right size
    code = main(["ingest", "--source", str(tmp_path / "data"), "--format", "penn-fudan",
                 "--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[0].startswith("sam-pipeline: error: 3 problems in "), err
    assert len(err) == 4, err
    for mask in masks[:3]:  # each problem on its own line, naming its file
        assert sum(mask.stem.removesuffix("_mask") in line for line in err[1:]) == 1, (mask.name, err)


def test_a_user_error_from_any_module_is_one_line(monkeypatch, capsys):
    from components.registry import RegistryError

    def fails(args):
        raise RegistryError("model 'x' has no version 'v9'\nsecond line must not show")

    monkeypatch.setattr(cli, "cmd_compile", fails)
    assert main(["compile"]) == 1
    assert capsys.readouterr().err == "sam-pipeline: error: model 'x' has no version 'v9'\n"


def test_anything_else_is_a_bug_and_keeps_its_traceback(monkeypatch):
    # A plain ValueError from our own package used to be swallowed into one line, hiding real bugs.
    def fails(args):
        raise ValueError("a bug in pipelines.cli")

    monkeypatch.setattr(cli, "cmd_compile", fails)
    with pytest.raises(ValueError, match="a bug"):
        main(["compile"])


@pytest.mark.parametrize("flags, needle", [
    (["--margin", "nan"], "--margin nan"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--seed", "-1"], "seed must be >= 0 (got -1)"),
    (["--lr=-1e-3"], "lr must be a finite number > 0"),
    (["--model-name", "../x"], "'../x'"),
    (["--checkpoint_name", "../x"], "checkpoint_name must be one folder name"),
    (["--dataset-name", "a/../b"], "'a/../b'"),
    (["--bucket", "my..bucket"], "--bucket: "),
])
def test_run_checks_every_parameter_before_any_work(flags, needle, tmp_path, monkeypatch, capsys):
    from helpers import free_port

    monkeypatch.chdir(tmp_path)
    # An unreachable source: had the check come after it, the error would be "cannot reach".
    code = main(["run", "-g", "cpu", "--dataset-source", f"http://127.0.0.1:{free_port()}/x.zip", *flags])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE, err
    assert err.count("\n") == 1 and needle in err and "cannot reach" not in err, err
    assert not out and not list(tmp_path.iterdir())  # nothing fetched, no local_outputs, no demo assets
