"""Datasets and models are named after their source unless told otherwise: a folder dataset is not stored
as `penn-fudan` nor registered as `sam-pennfudan`."""
from __future__ import annotations

import json

import pytest

from components.datasets.sources import PENNFUDAN_URL, name_from_source
from pipelines.cli import build_parser, main
from pipelines.run_args import fill_names


@pytest.mark.parametrize("source, fmt, name", [
    (PENNFUDAN_URL, "auto", "penn-fudan"),
    ("data/PennFudanPed.zip", "auto", "penn-fudan"),
    ("./anything", "penn-fudan", "penn-fudan"),
    ("./My Cells/", "folder", "my-cells"),
    ("s3://drop/datasets/cells_v2/", "auto", "cells_v2"),
    ("https://example.org/x/nuclei.zip", "auto", "nuclei"),
])
def test_name_from_source(source, fmt, name):
    assert name_from_source(source, fmt) == name


@pytest.mark.parametrize("argv, dataset, model", [
    (["--dataset-source", "./my_cells", "--dataset-format", "folder"], "my_cells", "sam-my_cells"),
    ([], "penn-fudan", "sam-pennfudan"),
    (["--demo"], "synthetic-penn-fudan", "sam-demo"),
    (["--dataset-source", "./my_cells", "--dataset-name", "cells", "--model-name", "m"], "cells", "m"),
])
def test_run_names_after_the_source_unless_told(argv, dataset, model):
    args = build_parser().parse_args(["run", *argv])
    fill_names(args)
    assert (args.dataset_name, args.model_name) == (dataset, model)


def test_ingest_of_a_folder_stores_it_under_the_folders_name(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "Street Scenes"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32)).save(root / "images" / f"a{i}.png")
        mask = Image.new("L", (32, 32))
        mask.paste(1, (4, 4, 20, 20))
        mask.save(root / "masks" / f"a{i}.png")
    assert main(["ingest", "--source", str(root), "--format", "folder"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "street-scenes" and "/datasets/street-scenes/" in out["dataset_uri"]
