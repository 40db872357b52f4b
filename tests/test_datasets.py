"""Synthetic data, layouts, validation, split and the manifest reader (no object store needed here,
except for reading a split back, which reads from the embedded S3 server)."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from components.datasets import synthetic
from components.datasets.adapters import FOLDER, PENN_FUDAN, get_layout
from components.datasets.ingest import ingest, prepare
from components.datasets.reader import SplitRefs, load_local_split, load_manifest
from components.datasets.split import assign_splits, check_fractions, content_hash
from components.datasets.validate import DatasetError
from components.hashing import sha256_file


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SAM_DATA_CACHE", str(tmp_path / "objects"))


def test_full_size_synthetic_matches_real_pennfudan_statistics():
    """make_pennfudan's default set has the real one's totals, and the images at its extremes (the narrowest,
    the widest, the most crowded) render with exactly the planned pedestrians; writing them is the same for
    every size (the tests below, on small sets)."""
    plan = synthetic.plan_pennfudan(74, 96, seed=0)  # make_pennfudan's defaults
    assert len(plan) == 170
    assert sum(s.id.startswith("FudanPed") for s in plan) == 74 and sum(s.id.startswith("PennPed") for s in plan) == 96
    counts, widths = [s.instances for s in plan], [s.width for s in plan]
    assert sum(counts) == 423 and max(counts) == 8 and min(counts) >= 1
    assert min(widths) == 253 and max(widths) == 1017
    for spec in {min(plan, key=lambda s: s.width), max(plan, key=lambda s: s.width),
                 max(plan, key=lambda s: s.instances)}:
        img, mask, boxes = synthetic.render(spec, seed=0)
        assert img.shape == (spec.height, spec.width, 3) and img.dtype == mask.dtype == np.uint8
        assert mask.shape == img.shape[:2] and len(boxes) == spec.instances
        assert list(np.unique(mask)) == list(range(spec.instances + 1))


def test_annotation_is_pascal_format_with_boxes_from_the_mask(tmp_path):
    base = synthetic.make_pennfudan(tmp_path, 1, 0, seed=3, size_range=(80, 80))
    text = (base / "Annotation" / "FudanPed00001.txt").read_text()
    with Image.open(base / "PedMasks" / "FudanPed00001_mask.png") as m, \
            Image.open(base / "PNGImages" / "FudanPed00001.png") as im:
        assert (im.mode, m.mode, m.size) == ("RGB", "L", im.size)  # as the real files are
        mask = np.asarray(m)
    n = int(mask.max())
    assert text.startswith("# Compatible with PASCAL Annotation Version 1.00\n"
                           'Image filename : "PennFudanPed/PNGImages/FudanPed00001.png"\n'
                           f"Image size (X x Y x C) : 80 x {mask.shape[0]} x 3\n")
    assert f"Objects with ground truth : {n} {{ " + '"PASpersonWalking" ' * n + "}" in text
    ys, xs = np.nonzero(mask == 1)
    assert (f'Bounding box for object 1 "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : '
            f"({xs.min() + 1}, {ys.min() + 1}) - ({xs.max() + 1}, {ys.max() + 1})") in text
    assert 'Pixel mask for object 1 "PASpersonWalking" : "PennFudanPed/PedMasks/FudanPed00001_mask.png"' in text


def test_make_samples_are_learnable_and_deterministic():
    a, b = synthetic.make_samples(6, seed=1, size=(40, 56)), synthetic.make_samples(6, seed=1, size=(40, 56))
    for s, t in zip(a, b):
        assert s.image.shape == (40, 56, 3) and s.image.dtype == np.uint8 and s.mask.shape == (40, 56)
        assert np.array_equal(s.image, t.image) and np.array_equal(s.mask, t.mask)
        ids = np.unique(s.mask)
        assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))
        # Objects differ clearly from the background: a decoder has something to learn.
        fg, bg = s.image[s.mask > 0].astype(float), s.image[s.mask == 0].astype(float)
        assert np.abs(fg.mean(0) - bg.mean(0)).max() > 40


def test_synthetic_cli_writes_a_zip(tmp_path):
    synthetic.main([str(tmp_path), "--zip", "--fudan", "2", "--penn", "1", "--min-width", "40", "--max-width", "60"])
    with prepare(str(tmp_path / "PennFudanPed.zip")) as prep:
        assert prep.layout == "penn-fudan" and [it.id for it in prep.items] == [
            "FudanPed00001", "FudanPed00002", "PennPed00001"]


# -- layouts ----------------------------------------------------------------------------------------
def test_folder_layout_matches_both_mask_names_and_groups_by_prefix(tmp_path):
    synthetic.make_folder(tmp_path, [f"cat{i}" for i in range(3)], mask_suffix="")
    synthetic.make_folder(tmp_path, [f"dog{i}" for i in range(3)], seed=1, mask_suffix="_mask")
    layout, problems = get_layout("auto", tmp_path)
    assert layout is FOLDER and problems == []
    pairs, problems = layout.pairs(tmp_path)
    assert problems == []
    assert [(p.id, p.group, p.mask_path.name) for p in pairs][:1] == [("cat0", "cat", "cat0.png")]
    assert {p.group for p in pairs} == {"cat", "dog"} and pairs[-1].mask_path.name == "dog2_mask.png"


def test_folder_layout_single_group_when_prefixes_are_too_small(tmp_path):
    synthetic.make_folder(tmp_path, ["a1", "b1", "c1", "001"])
    pairs, _ = FOLDER.pairs(tmp_path)
    assert {p.group for p in pairs} == {"all"}


def test_pennfudan_layout_found_at_top_or_one_level_down(tmp_path):
    base = synthetic.make_pennfudan(tmp_path / "x", 1, 1, 0, (40, 40))
    assert PENN_FUDAN.find_root(tmp_path / "x") == base and PENN_FUDAN.find_root(base) == base
    assert get_layout("auto", tmp_path / "x")[0] is PENN_FUDAN
    with pytest.raises(ValueError, match="unknown dataset format 'voc'"):
        get_layout("voc", tmp_path)


# -- validation -------------------------------------------------------------------------------------
def test_every_problem_is_reported_at_once(tmp_path):
    base = synthetic.make_pennfudan(tmp_path, 3, 2, 0, (40, 56))
    (base / "PedMasks" / "FudanPed00001_mask.png").unlink()
    small = Image.new("L", (10, 10), 1)
    small.putpixel((0, 0), 0)
    small.save(base / "PedMasks" / "FudanPed00002_mask.png")
    (base / "PNGImages" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError) as err:
        with prepare(str(base)):
            pass
    lines = str(err.value).splitlines()
    assert lines[0] == f"3 problems in {base}:"
    assert lines[1].strip().startswith("PNGImages/notes.txt: not an image file")
    assert any(re.match(r"\s+PNGImages/FudanPed00001\.png: no mask \(expected PedMasks/FudanPed00001_mask\.png\)", ln)
               for ln in lines)
    assert any(re.fullmatch(r"\s+PNGImages/FudanPed00002\.png: image is \d+x\d+ but its mask "
                            r"PedMasks/FudanPed00002_mask\.png is 10x10", ln) for ln in lines)
    assert len(err.value.problems) == 3


@pytest.mark.parametrize("mode,data,match", [
    ("I;16", np.full((8, 8), 300, np.uint16), r"mask is 16-bit \(I;16\); masks must be 8-bit L or P"),
    ("RGB", np.zeros((8, 8, 3), np.uint8), r"mask is mode RGB \(RGB\)"),
    ("L", np.zeros((8, 8), np.uint8), r"mask has no instance \(every pixel is 0 = background\)"),
    ("L", np.full((8, 8), 255, np.uint8), r"mask has no background pixel"),
])
def test_bad_masks(tmp_path, mode, data, match):
    synthetic.make_folder(tmp_path, ["a"], size=(8, 8))
    Image.fromarray(data, mode if mode != "I;16" else None).save(tmp_path / "masks" / "a.png")
    with pytest.raises(DatasetError, match=r"1 problem in .*:\n  masks/a\.png: " + match):
        load_local_split(tmp_path, "train")


def test_palette_masks_are_accepted_and_read_as_ids(tmp_path):
    synthetic.make_folder(tmp_path, ["a"], size=(8, 8))
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4], mask[5:7, 5:7] = 1, 2
    pal = Image.fromarray(mask, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    pal.save(tmp_path / "masks" / "a.png")
    (sample,) = load_local_split(tmp_path, "train")
    assert np.array_equal(sample.mask, mask)


def test_undecodable_image_and_empty_dataset(tmp_path):
    synthetic.make_folder(tmp_path / "one", ["a"], size=(8, 8))
    (tmp_path / "one" / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"images/a\.png: cannot decode as an image"):
        load_local_split(tmp_path / "one", "train")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"1 problem in .*empty:\n  empty dataset: no images found"):
        load_local_split(tmp_path / "empty", "train")


# -- split ------------------------------------------------------------------------------------------
def _members(rng, n: int) -> list[tuple[str, str]]:
    return [(f"img{rng.integers(1 << 40):010x}", f"{rng.integers(1 << 62):064x}") for _ in range(n)]


def test_an_images_split_never_moves_when_the_dataset_grows_shrinks_or_is_renamed():
    """Property over 300 seeded datasets: an image keeps its split whatever else is added, removed or renamed,
    except the `filled` images a split that would otherwise be empty took in (only tiny datasets have any)."""
    rng = np.random.default_rng(0)
    for case in range(300):
        seed = int(rng.integers(3))
        big = _members(rng, int(rng.integers(3, 60)))
        small = [big[i] for i in sorted(rng.choice(len(big), int(rng.integers(3, len(big) + 1)), replace=False))]
        renamed = [(f"renamed-{i}", sha) for i, (_, sha) in enumerate(big)]
        a, b, c = (assign_splits(m, seed) for m in (small, big, renamed))
        moved_in = {i for ids in (*a.filled.values(), *b.filled.values()) for i in ids}
        for (ident, sha) in small:
            if ident not in moved_in:
                assert a.splits[ident] == b.splits[ident], (case, ident)
        assert [c.splits[f"renamed-{i}"] for i in range(len(big))] == [b.splits[i] for i, _ in big]


def test_the_same_bytes_under_two_names_are_one_image_in_one_split():
    rng = np.random.default_rng(1)
    for _ in range(50):
        members = _members(rng, 20)
        twins = members + [(f"copy-of-{i}", sha) for i, sha in members[:10]]
        got = assign_splits(twins, 0).splits
        assert all(got[f"copy-of-{i}"] == got[i] for i, _ in members[:10])


def test_split_follows_the_fractions_in_every_group_and_depends_on_the_seed():
    """Per image, independently of its group: each group gets the fractions in expectation (170 images split
    like Penn-Fudan's 74 + 96 land within a few images of 70 / 15 / 15 in both groups)."""
    rng = np.random.default_rng(2)
    groups = {"FudanPed": _members(rng, 74), "PennPed": _members(rng, 96)}
    members = [m for ms in groups.values() for m in ms]
    a = assign_splits(members, 0)
    assert a.splits == assign_splits(list(reversed(members)), 0).splits and not a.filled
    assert a.splits != assign_splits(members, 1).splits
    for ms in groups.values():
        sizes = {s: sum(a.splits[i] == [s] for i, _ in ms) for s in ("train", "val", "test")}
        n = len(ms)
        for split, frac in (("train", .7), ("val", .15), ("test", .15)):  # binomial, within 3.5 sd
            assert abs(sizes[split] - n * frac) <= 3.5 * (n * frac * (1 - frac)) ** .5, (sizes, split)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_tiny_datasets_fill_every_split(n):
    rng = np.random.default_rng(n)
    for _ in range(40):
        got = assign_splits(_members(rng, n), seed=0)
        serving = {s: sum(s in v for v in got.splits.values()) for s in ("train", "val", "test")}
        if n < 3:  # too few to hold any out: every image trains, val reuses train, test reuses val
            assert serving == dict.fromkeys(serving, n)
        else:  # a real hold-out: every split has an image and nobody serves two
            assert min(serving.values()) >= 1 and all(len(v) == 1 for v in got.splits.values())
            assert all(got.splits[i] == [s] for s, ids in got.filled.items() for i in ids)


def test_growing_a_penn_fudan_folder_moves_no_image(tmp_path, store):
    """The real layout, ingested: drop 8 of 40 images, ingest; add them back, ingest: no image moved."""
    full = synthetic.make_pennfudan(tmp_path / "full", n_fudan=18, n_penn=22, seed=4, size_range=(32, 40))
    part = tmp_path / "part" / "PennFudanPed"
    shutil.copytree(full, part)
    dropped = sorted(p.stem for p in (part / "PNGImages").iterdir())[::5]
    for stem in dropped:
        for f in (part / "PNGImages" / f"{stem}.png", part / "PedMasks" / f"{stem}_mask.png",
                  part / "Annotation" / f"{stem}.txt"):
            f.unlink()
    before = ingest(str(part), "penn-fudan", "grow", store).manifest
    after = ingest(str(full), "penn-fudan", "grow", store).manifest
    assert before["content_hash"] != after["content_hash"] and before["split"]["rule"] == after["split"]["rule"]
    was = {it["id"]: it["split"] for it in before["items"]}
    now = {it["id"]: it["split"] for it in after["items"]}
    assert len(was) == 32 and len(now) == 40
    assert {i: now[i] for i in was} == was


def test_fractions_are_checked_and_hash_depends_on_them():
    with pytest.raises(ValueError, match="sum to 1"):
        check_fractions({"train": 0.5, "val": 0.1, "test": 0.1})
    files = [("images/a.png", "1" * 64)]
    assert content_hash(files, 0, None) == content_hash(list(files), 0, {"train": 0.7, "val": 0.15, "test": 0.15})
    assert content_hash(files, 0, None) != content_hash(files, 1, None)
    assert content_hash(files, 0, None) != content_hash([("images/a.png", "2" * 64)], 0, None)


# -- reader -----------------------------------------------------------------------------------------
def test_a_split_reads_verifies_and_caches(tmp_path, store):
    base = synthetic.make_pennfudan(tmp_path / "src", 3, 3, 0, (40, 56))
    result = ingest(str(base), "auto", "pf", store)
    manifest = load_manifest(store, result.manifest_uri)
    assert load_manifest(store, result.dataset_uri) == manifest  # the folder uri works too
    cache = tmp_path / "objects"
    got = {s: _read(SplitRefs(store, manifest, s, cache)) for s in ("train", "val", "test")}
    assert sorted(x.id for v in got.values() for x in v) == [it["id"] for it in manifest["items"]]
    sample = got["train"][0]
    item = next(it for it in manifest["items"] if it["id"] == sample.id)
    assert sample.image.shape == (item["height"], item["width"], 3) and sample.image.dtype == np.uint8
    assert sample.image_sha256 == item["image"]["sha256"] and int(sample.mask.max()) == item["instances"]
    assert np.array_equal(sample.mask, np.asarray(Image.open(base / "PedMasks" / f"{sample.id}_mask.png")))
    cached = cache / item["image"]["sha256"][:2] / item["image"]["sha256"]
    assert sha256_file(cached) == item["image"]["sha256"]
    cached.write_bytes(b"tampered")  # a bad cache entry is fetched again, never decoded
    again = next(x for x in _read(SplitRefs(store, manifest, "train", cache)) if x.id == sample.id)
    assert np.array_equal(again.image, sample.image)
    local = load_local_split(base, "train")
    assert [x.id for x in local] == [x.id for x in got["train"]]


def _read(split: SplitRefs) -> list:
    """Every sample of a split, as finetune and evaluate read them (fetched, verified, cached, decoded)."""
    return [split.load(i) for i in range(len(split))]
