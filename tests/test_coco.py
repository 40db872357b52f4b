"""COCO instance-segmentation exports in: small COCO files written here, read through the real ingest path
(pycocotools decoding, validation, split, the embedded S3 server)."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.datasets import synthetic
from components.datasets.coco import encode_rle, uncompressed_rle
from components.datasets.ingest import ingest, prepare
from components.datasets.reader import SplitRefs, decode_sample, load_manifest
from components.datasets.synthetic_coco import make_coco, write_coco
from components.datasets.validate import DatasetError
from components.label_values import IGNORE

pytestmark = pytest.mark.usefixtures("data_dir")


def rendered(source, fmt="coco", **kw) -> dict[str, tuple[np.ndarray, tuple]]:
    """id -> (instance-id mask, categories) as ingest would store them."""
    with prepare(str(source), fmt, **kw) as prep:
        return {it.id: (decode_sample(it.id, it.image_path, it.mask_path).mask, it.categories) for it in prep.items}


def image(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def two_boxes(h=40, w=50) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[5:20, 5:25] = 1
    mask[22:35, 30:45] = 2
    return mask


@pytest.mark.parametrize("encoding", ["rle", "rle-uncompressed"])
def test_rle_compressed_and_uncompressed_give_the_exact_masks(tmp_path, encoding):
    samples = [(s.id, s.image, s.mask) for s in synthetic.make_samples(4, seed=1, size=(48, 56))]
    write_coco(tmp_path, samples, encoding, categories=("a", "b"))
    out = rendered(tmp_path)
    for stem, _, mask in samples:
        got, cats = out[stem]
        assert np.array_equal(got, mask)
        assert cats == tuple(("a", "b")[(k - 1) % 2] for k in range(1, int(mask.max()) + 1))


def test_uncompressed_rle_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils

    mask = two_boxes().astype(bool)
    mask[0, 0] = True  # a run of object first: counts start with a zero-length background run
    rle = uncompressed_rle(mask)
    assert rle["counts"][0] == 0
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects(rle, *mask.shape)).astype(bool), mask)
    assert np.array_equal(mask_utils.decode({**encode_rle(mask), "counts": encode_rle(mask)["counts"].encode()}), mask)


def test_polygons_are_rasterised(tmp_path):
    write_coco(tmp_path, [("img", image(), two_boxes())], "polygon")
    got, cats = rendered(tmp_path)["img"]
    for k in (1, 2):
        truth, found = two_boxes() == k, got == k
        assert (truth & found).sum() / (truth | found).sum() > 0.85, k
    assert cats == ("object", "object")


def test_crowd_regions_become_ignore_and_are_not_instances(tmp_path, store):
    mask = two_boxes()
    mask[36:40, 0:50] = IGNORE
    write_coco(tmp_path, [("crowded", image(), mask)], "rle")
    got, cats = rendered(tmp_path)["crowded"]
    assert np.array_equal(got, mask) and cats == ("object", "object")
    m = ingest(str(tmp_path), "coco", "crowd", store).manifest
    assert m["items"][0]["instances"] == 2 and m["items"][0]["categories"] == ["object", "object"]
    assert m["ignore_id"] == IGNORE and m["categories"] == [{"id": 1, "name": "object"}]
    again = ingest(str(tmp_path), "coco", "crowd", store)  # the same export: the same version, nothing uploaded
    assert again.content_hash == m["content_hash"] and (again.uploaded, again.skipped) == (0, 2)


def test_categories_filter_and_empty_images_dropped_or_kept(tmp_path, caplog):
    write_coco(tmp_path, [("both", image(), two_boxes()), ("none", image(seed=1), np.zeros((40, 50), np.uint8))],
               "rle", categories=("cat", "dog"))
    with caplog.at_level(logging.WARNING):
        assert set(rendered(tmp_path)) == {"both"}  # no instance: dropped by default
    assert "1 images without an instance (of the kept categories) left out; --keep-empty keeps them" in caplog.text
    kept = rendered(tmp_path, keep_empty=True)
    assert kept["none"][1] == () and not kept["none"][0].any()
    dogs, cats = rendered(tmp_path, categories=["dog"])["both"]
    assert cats == ("dog",) and np.array_equal(dogs, (two_boxes() == 2).astype(np.uint8))
    with pytest.raises(DatasetError, match=r"--categories: no category 'bird' in the annotations \(they have: cat, dog\)"):
        rendered(tmp_path, categories=["bird"])
    with pytest.raises(DatasetError, match="apply to COCO datasets only"):
        rendered(synthetic.make_folder(tmp_path / "f", ["a"]), "auto", categories=["dog"])


def test_auto_detects_coco_from_a_zip_and_the_hash_follows_the_data(tmp_path):
    folder = make_coco(tmp_path / "export", 5, seed=2, categories=("a", "b"))
    zipped = synthetic.zip_folder(folder, tmp_path / "export.zip")
    with prepare(str(folder), "auto") as a, prepare(str(zipped), "auto") as b:
        assert a.layout == b.layout == "coco" and a.content_hash == b.content_hash
        assert [it.split for it in a.items] == [it.split for it in b.items]
    doc = json.loads((folder / "annotations.json").read_text())
    doc["categories"][0]["name"] = "renamed"
    (folder / "annotations.json").write_text(json.dumps(doc))
    with prepare(str(folder), "coco") as c:
        assert c.content_hash != a.content_hash  # same pixels, other labels: another version


def test_a_coco_export_from_s3_ingests_and_reads_back(tmp_path, store):
    folder = make_coco(tmp_path / "export", 6, seed=3)
    for p in folder.rglob("*"):
        if p.is_file():
            store.put_file(store.key("incoming", p.relative_to(folder).as_posix()), p)
    result = ingest(store.uri(store.key("incoming")), "auto", "from-s3", store)
    assert result.manifest["layout"] == "coco" and result.to_json()["images"] == 6
    manifest = load_manifest(store, result.manifest_uri)
    samples = _read(SplitRefs(store, manifest, "train", tmp_path / "cache"))
    masks = {s.id: s.mask for s in synthetic.make_samples(6, seed=3)}
    assert samples and all(np.array_equal(s.mask, masks[s.id]) for s in samples)


def test_pennfudan_masks_written_as_coco_ingest_as_the_same_instances(tmp_path):
    pf = synthetic.make_pennfudan(tmp_path / "pf", 4, 5, seed=0, size_range=(40, 64))
    samples = []
    for img in sorted((pf / "PNGImages").glob("*.png")):
        mask = np.asarray(Image.open(pf / "PedMasks" / f"{img.stem}_mask.png"))
        samples.append((img.stem, img, mask))
    write_coco(tmp_path / "coco", samples, "rle", categories=("person",))
    with prepare(str(pf), "penn-fudan") as masks_layout, prepare(str(tmp_path / "coco"), "coco") as coco:
        a = {it.id: (it.split, decode_sample(it.id, it.image_path, it.mask_path).mask) for it in masks_layout.items}
        b = {it.id: (it.split, decode_sample(it.id, it.image_path, it.mask_path).mask) for it in coco.items}
        assert [it.instances for it in masks_layout.items] == [it.instances for it in coco.items]
    assert a.keys() == b.keys()
    for stem in a:
        assert a[stem][0] == b[stem][0], stem  # the same split rule puts each image in the same split
        assert np.array_equal(a[stem][1], b[stem][1]), stem


def _broken_export(root: Path) -> Path:
    write_coco(root, [("a", image(), two_boxes()), ("b", image(seed=1), two_boxes()),
                      ("c", image(seed=2), two_boxes())], "rle")
    doc = json.loads((root / "annotations.json").read_text())
    (root / "images" / "b.png").unlink()
    doc["images"].append({"id": 1, "file_name": "dup.png", "width": 50, "height": 40})
    doc["images"].append({"id": 9, "file_name": "big.png", "width": 50, "height": 40})
    Image.fromarray(image(30, 50), "RGB").save(root / "images" / "big.png")  # 50x30, the JSON says 50x40
    anns = doc["annotations"]
    anns[0]["segmentation"] = [[1, 1, 10, 10]]
    anns[1]["segmentation"]["size"] = [41, 50]
    anns.append({"id": 70, "image_id": 77, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]})
    anns.append({"id": 71, "image_id": 3, "category_id": 5, "segmentation": [[0, 0, 5, 0, 5, 5]]})
    anns.append({"id": 72, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 9, 0, 9, 9]]})
    anns.append({"id": 73, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]})  # a box, no mask
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def test_every_problem_at_once_each_naming_file_and_annotation_and_nothing_uploaded(tmp_path, store):
    with pytest.raises(DatasetError) as err:
        ingest(str(_broken_export(tmp_path / "bad")), "coco", "bad", store)
    problems = err.value.problems
    expected = [
        r"annotations.json: image id 1 appears twice \(a.png and dup.png\)",
        r"annotations.json: annotation 70: image_id 77 is not among the images",
        r"annotations.json: annotation 71: category_id 5 is not among the categories",
        r"annotations.json: image id 2 \(b.png\): no such image",
        r"annotations.json: image id 1 \(a.png\): annotation 1: a polygon with 2 points \(needs at least 3",
        r"annotations.json: image id 1 \(a.png\): annotation 2: RLE size \[41, 50\] differs from the image's "
        r"\[height, width\] \[40, 50\]",
        r"images/big.png: image is 50x30 but annotations.json: image id 9 \(big.png\) says 50x40",
        r"annotations.json: image id 3 \(c.png\): annotation 73: no segmentation \(a box-only annotation",
    ]
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), (pattern, problems)
    assert len(problems) == len(expected), problems
    assert store.list(store.key("datasets")) == []


def test_not_coco_and_not_json_are_one_line_each(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations.json").write_text(json.dumps({"info": {}, "licenses": []}))
    with pytest.raises(DatasetError, match=r"annotations.json: not a COCO file \(expected an object with 'images'"):
        rendered(tmp_path)
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"annotations.json: not valid JSON"):
        rendered(tmp_path)


def test_overlaps_go_to_the_smaller_instance_and_fully_covered_is_an_error(tmp_path, caplog):
    root = tmp_path / "overlap"
    write_coco(root, [("o", image(), two_boxes())], "rle")
    doc = json.loads((root / "annotations.json").read_text())
    big = np.zeros((40, 50), bool)
    big[0:30, 0:40] = True  # covers all of instance 1 and part of instance 2
    doc["annotations"].append({"id": 9, "image_id": 1, "category_id": 1, "segmentation": encode_rle(big)})
    (root / "annotations.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        got, _ = rendered(root)["o"]
    assert np.array_equal(got == 1, two_boxes() == 1) and np.array_equal(got == 2, two_boxes() == 2)
    assert np.array_equal(got == 3, big & (two_boxes() == 0))
    assert "annotation 9 overlaps annotation(s) 1, 2" in caplog.text
    doc["annotations"][2]["segmentation"] = encode_rle(two_boxes() == 1)  # now exactly under instance 1
    doc["annotations"][0]["segmentation"] = encode_rle(two_boxes() > 0)
    (root / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="annotation 1 is entirely covered by smaller instances"):
        rendered(root)


def test_more_than_254_instances_is_an_error(tmp_path):
    mask = np.zeros((20, 260), np.uint16)
    mask[:, :255] = np.arange(1, 256)[None, :]
    root = tmp_path / "many"
    (root / "images").mkdir(parents=True)
    Image.fromarray(image(20, 260), "RGB").save(root / "images" / "many.png")
    anns = [{"id": k, "image_id": 1, "category_id": 1, "segmentation": encode_rle(mask == k)} for k in range(1, 256)]
    (root / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "many.png", "width": 260, "height": 20}], "annotations": anns,
        "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(DatasetError, match="255 instances; masks are 8-bit, so at most 254 per image"):
        rendered(root)


def test_roboflow_and_cvat_layouts_are_found(tmp_path):
    rf = make_coco(tmp_path / "rf" / "train", 3, seed=4)
    for p in (rf / "images").iterdir():
        shutil.move(p, rf / p.name)  # Roboflow: images beside train/_annotations.coco.json
    (rf / "annotations.json").rename(rf / "_annotations.coco.json")
    (rf / "images").rmdir()
    assert len(rendered(tmp_path / "rf")) == 3
    cvat = make_coco(tmp_path / "cvat", 3, seed=4)  # CVAT: images/ + annotations/instances_default.json
    (cvat / "annotations").mkdir()
    (cvat / "annotations.json").rename(cvat / "annotations" / "instances_default.json")
    assert rendered(tmp_path / "cvat").keys() == rendered(tmp_path / "rf").keys()


def test_cli_ingests_coco_with_categories_and_reports_problems_one_per_line(tmp_path, s3_env, capsys):
    from pipelines.cli import main

    folder = make_coco(tmp_path / "export", 6, seed=6, categories=("a", "b"))
    store_flags = ["--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix]
    assert main(["ingest", "--source", str(folder), "--format", "coco", "--categories", "b", "--name", "bees",
                 *store_flags]) == 0
    out = json.loads(capsys.readouterr().out)
    instances_b = sum((s.mask == 2).any() for s in synthetic.make_samples(6, seed=6))
    assert out["instances"] == instances_b and out["images"] == instances_b  # images without a "b" are dropped
    assert main(["ingest", "--source", str(_broken_export(tmp_path / "bad")), "--name", "bad", *store_flags]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "sam-pipeline: error: 8 problems in " + str(tmp_path / "bad") + ":"
    assert len(err) == 9 and all(line.startswith("  ") for line in err[1:])


def _read(split: SplitRefs) -> list:
    """Every sample of a split, as finetune and evaluate read them (fetched, verified, cached, decoded)."""
    return [split.load(i) for i in range(len(split))]
