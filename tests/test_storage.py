"""Object storage against a real S3 server process (moto) on loopback."""
from __future__ import annotations

from dataclasses import replace

import pytest

from components.hashing import sha256_bytes, sha256_file
from components.s3server import embedded_s3
from components.storage import ObjectStore, S3Config, StorageError


def test_round_trip_records_sha256(store, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 3000)
    info = store.put_file(store.key("dir", "a.bin"), src)
    assert info.sha256 == sha256_file(src)
    st = store.stat(store.key("dir", "a.bin"))
    assert (st.size, st.sha256) == (3000, info.sha256)
    out = tmp_path / "out" / "a.bin"
    store.get_file(st.key, out)
    assert out.read_bytes() == src.read_bytes()
    assert store.list(store.key("dir")) == [st.key]
    assert store.uri(st.key) == f"s3://{store.config.bucket}/{st.key}"


def test_a_server_side_copy_keeps_the_bytes_and_their_sha256(store, tmp_path):
    src = tmp_path / "best.pt"
    src.write_bytes(b"weights" * 1000)
    store.put_file(store.key("ck", "best.pt"), src)
    store.copy(store.key("ck", "best.pt"), store.key("ck", "latest.pt"))
    st = store.stat(store.key("ck", "latest.pt"))
    assert (st.size, st.sha256) == (7000, sha256_file(src))
    store.get_file(st.key, tmp_path / "latest.pt")  # checks the bytes against the recorded sha256
    assert (tmp_path / "latest.pt").read_bytes() == src.read_bytes()


def test_json_and_missing(store):
    store.put_json(store.key("m.json"), {"b": 1})
    assert store.get_json(store.key("m.json")) == {"b": 1}
    assert store.stat(store.key("nope")) is None
    with pytest.raises(StorageError, match="does not exist"):
        store.get_bytes(store.key("nope"))


def test_get_file_refuses_corrupt_object_and_leaves_nothing(store, tmp_path):
    key = store.key("c.bin")
    # An object whose recorded sha256 does not match its bytes (a torn or tampered upload).
    store.client.put_object(store.config.bucket, key, __import__("io").BytesIO(b"abc"), 3,
                            metadata={"sha256": sha256_bytes(b"abd")})
    dest = tmp_path / "c.bin"
    with pytest.raises(StorageError, match="sha256 mismatch"):
        store.get_file(key, dest)
    assert list(tmp_path.iterdir()) == []


def test_put_many_parallel_then_skips(store, tmp_path):
    items = []
    for i in range(20):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]) * (100 + i))
        items.append((store.key("many", p.name), p, None))
    assert store.put_many(items, workers=8) == (20, 0)
    assert store.put_many(items, workers=8) == (0, 20)
    (tmp_path / "3.bin").write_bytes(b"changed")
    assert store.put_many(items, workers=8) == (1, 19)


def test_missing_bucket_is_created(s3):
    store = ObjectStore(replace(s3, bucket="fresh-bucket"))
    assert store.client.bucket_exists("fresh-bucket")


def test_unreachable_endpoint_is_one_clear_line():
    from helpers import free_port

    cfg = S3Config(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b")
    with pytest.raises(StorageError) as e:
        ObjectStore(cfg, retries=1)
    msg = str(e.value)
    assert "unreachable" in msg and cfg.endpoint in msg and "\n" not in msg


def test_authentication_enforced():
    with embedded_s3(auth=True) as cfg:
        good = ObjectStore(cfg)
        good.put_bytes(good.key("x"), b"1")
        assert good.get_bytes(good.key("x")) == b"1"
        for bad in (replace(cfg, secret_key="wrong"), replace(cfg, access_key="AKIANOTAKEY")):
            with pytest.raises(StorageError, match="rejected the credentials"):
                ObjectStore(bad)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", "https://s3.example.com/")
    monkeypatch.setenv("accesskey", "kfp-key")
    monkeypatch.setenv("secretkey", "kfp-secret")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    cfg = S3Config.from_env(prefix="p", bucket=None)
    assert (cfg.endpoint, cfg.secure, cfg.bucket, cfg.prefix) == ("s3.example.com", True, "mlpipeline", "p/")
    assert (cfg.access_key, cfg.secret_key) == ("kfp-key", "kfp-secret")
    monkeypatch.delenv("S3_ENDPOINT")
    assert S3Config.from_env().endpoint == "seaweedfs.kubeflow:9000"


def test_parse_uri():
    assert ObjectStore.parse_uri("s3://b/k/e/y") == ("b", "k/e/y")
    with pytest.raises(StorageError):
        ObjectStore.parse_uri("http://b/k")
