"""How a failed `sam-pipeline run` reports itself: through the real kfp.local, the real S3 server and real
task subprocesses, the console says why in the same lines the step alone would print."""
from __future__ import annotations

import json

import pytest

from pipelines.cli import main


def _bad_folder_dataset(root, n: int):
    """A folder dataset of `n` images whose masks are all RGB (each one a problem naming its file)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32)).save(root / "images" / f"img{i:02d}.png")
        Image.new("RGB", (32, 32), (1, 1, 1)).save(root / "masks" / f"img{i:02d}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("n_bad", [1, 12])
def test_a_rejected_dataset_shows_its_problems_on_the_console(n_bad, pipeline_sources, s3_env, tmp_path,
                                                               monkeypatch, capsys):
    sources, sha = pipeline_sources
    data = _bad_folder_dataset(tmp_path / "mine", n_bad)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "-g", "cpu", "--dataset-source", str(data), "--dataset-format", "folder",
                 "--weights-url", str(sources / "vit_t_random.pth"), "--weights-sha256", sha,
                 "--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix,
                 "--summary-json", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[0].startswith("sam-pipeline: error: pipeline failed at ingest-dataset (DatasetError: "
                             f"{n_bad} problem"), err
    if n_bad == 1:  # one problem: one line, naming the file
        assert len(err) == 1 and "img00.png" in err[0], err
    else:  # the header, ten problems each naming its file, and how many more (the log has them all)
        assert len(err) == 12, err
        assert all(f"img{i:02d}" in err[1 + i] for i in range(10)), err
        assert err[-1].strip() == "... and 2 more (see the log)"
    problems = json.loads((tmp_path / "s.json").read_text())["tasks"]["ingest-dataset"]["problems"]
    assert len(problems) == min(n_bad, 11)
