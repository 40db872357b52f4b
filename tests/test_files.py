"""`components/files.py`: the one "write a temp file beside the target, then os.replace" helper."""
from __future__ import annotations

import threading

import pytest

from components.files import Discard, atomic_path, unique_temp


def test_the_target_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_path(target, suffix=".json") as tmp:
        tmp.write_text("new")
        assert not target.exists()  # readers never see it half-written
        assert tmp.parent == target.parent and tmp.name.startswith(".out.json.part-") and tmp.suffix == ".json"
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]


def test_an_error_or_a_discard_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(ValueError, match="bad bytes"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("bad bytes")
    with atomic_path(target, tag="from-store") as tmp:
        tmp.write_text("damaged")
        raise Discard
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_temp_names_are_unique_per_thread_and_call(tmp_path):
    names: list[str] = []
    alive = threading.Barrier(4)  # all four threads exist at once, so no thread id is reused

    def many():
        names.extend(unique_temp(tmp_path / "x").name for _ in range(50))
        alive.wait()

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 200
    assert {n.split("-")[2] for n in names} == {str(t.ident) for t in threads}
