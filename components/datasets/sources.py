"""Where a dataset comes from: an http(s) zip, a local zip or folder, or s3://bucket/prefix.

Each source is turned into a local folder for the adapters. A downloaded zip is kept in the data cache
(`./data/`, DATA_DIR overrides, as in the seed) only after the whole dataset validated, so a broken or
wrong download is never found there by a later run.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from components.datasets.validate import DatasetError
from components.download import DownloadError, download
from components.files import atomic_path, pid_alive
from components.storage import ObjectStore, StorageError

PENNFUDAN_URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
WORK_PREFIX = "sam-ingest-"
# A work folder is removed only when its owner is dead and it is this old: a pid can be reused, and a
# folder just created by a process that is starting must not vanish under it.
STALE_AFTER_S = 300


def data_dir() -> Path:
    return Path(os.environ.get("DATA_DIR", "data"))


@dataclass
class LocalSource:
    root: Path  # a folder the adapters search
    label: str  # how messages name the source


def name_from_source(source: str, dataset_format: str = "auto") -> str:
    """The dataset name a source gets unless one is given: `penn-fudan` for Penn-Fudan (its format, its URL
    or a PennFudanPed zip/folder), otherwise the folder's or zip's own name in the store's name alphabet
    (`./My Data/` -> `my-data`, `s3://b/drops/cells/` -> `cells`)."""
    import re

    stem = PurePosixPath(urlparse(source).path.rstrip("/")).name.removesuffix(".zip")
    if dataset_format == "penn-fudan" or source == PENNFUDAN_URL or stem.lower().startswith("pennfudan"):
        return "penn-fudan"
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return name or "dataset"


def cache_path(url: str, cache_dir: Path | None = None) -> Path:
    cache_dir = cache_dir or data_dir()
    name = PurePosixPath(urlparse(url).path).name or "dataset.zip"
    if url == PENNFUDAN_URL:
        return cache_dir / name  # the seed's ./data/PennFudanPed.zip
    # Other URLs may share a file name; the URL's hash keeps their caches apart.
    return cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def clean_stale_work_dirs(now: float | None = None) -> list[Path]:
    """Remove `sam-ingest-<pid>-*` work folders that a killed ingest left in the temp folder."""
    now = time.time() if now is None else now
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        pid = folder.name[len(WORK_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            if now - folder.stat().st_mtime < STALE_AFTER_S:
                continue
            shutil.rmtree(folder)
            removed.append(folder)
        except OSError:
            pass  # another ingest is cleaning it at the same time, or it is not ours to remove
    return removed


def clean_stale_downloads(cache_dir: Path | None = None) -> list[Path]:
    """Remove the partial downloads (`.<name>.unverified-<pid>-…`) of killed processes from the data cache,
    and the cache folder itself when that leaves it empty: a killed run runs no clean-up of its own."""
    cache_dir = cache_dir or data_dir()
    removed = []
    for part in cache_dir.glob(".*.unverified-*") if cache_dir.is_dir() else ():
        pid = part.name.rsplit(".unverified-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            part.unlink(missing_ok=True)
            removed.append(part)
    if removed:
        _remove_if_empty(cache_dir)
    return removed


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another download landed), or already gone
        folder.rmdir()


@contextlib.contextmanager
def open_source(source: str, store: ObjectStore | None = None, cache_dir: Path | None = None) -> Iterator[LocalSource]:
    """The source's files in a local folder for the `with` block; a downloaded zip enters the data cache
    only when the block ends without an error (the dataset validated and, for ingest, was committed)."""
    source = str(source)
    clean_stale_downloads(cache_dir)
    # The pid in the name lets a later ingest recognise this folder as stale if this one is killed.
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{os.getpid()}-") as tmp, \
            contextlib.ExitStack() as cache_entry:
        work = Path(tmp)
        if source.startswith(("http://", "https://")):
            local = _from_url(source, work, cache_dir, cache_entry)
        elif source.startswith("s3://"):
            local = _from_s3(source, store, work)
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                local = LocalSource(path, source)
            elif path.is_file():
                local = LocalSource(_unzip(path, work / "unzipped", source), source)
            else:
                raise DatasetError(source, [f"{source}: no such file or folder"])
        yield local


def _from_url(url: str, work: Path, cache_dir: Path | None, cache_entry: contextlib.ExitStack) -> LocalSource:
    """The zip at `url`, from the data cache or downloaded into a temp file that `cache_entry` (an open
    `atomic_path`) moves into the cache when the caller's block ends without an error."""
    cached = cache_path(url, cache_dir)
    if cached.is_file():
        try:
            return LocalSource(_unzip(cached, work / "unzipped", url), url)
        except DatasetError:
            cached.unlink()  # a damaged cache entry is fetched again, never used
    if not cached.parent.exists():  # made for this download: not left behind empty when it fails
        cache_entry.callback(_remove_if_empty, cached.parent)  # runs after atomic_path's own clean-up
    # Beside the cache entry (same filesystem, so the move is an atomic rename), hidden from lookups.
    pending = cache_entry.enter_context(atomic_path(cached, tag="unverified"))
    try:
        download(url, pending, desc=cached.name)
    except DownloadError as e:
        raise DatasetError(url, [str(e)]) from None
    return LocalSource(_unzip(pending, work / "unzipped", url), url)


def _from_s3(uri: str, store: ObjectStore | None, work: Path) -> LocalSource:
    """Copy s3://bucket/prefix (a folder of files, or one zip) to the work folder."""
    if store is None:
        raise DatasetError(uri, [f"{uri}: an object store is needed to read it"])
    bucket, prefix = ObjectStore.parse_uri(uri)
    src = store if bucket == store.config.bucket else store.for_bucket(bucket)
    if prefix.endswith(".zip"):
        keys = [prefix] if src.exists(prefix) else []
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
    else:
        base = prefix.rstrip("/") + "/" if prefix else ""
        keys = src.list(base)
    if not keys:
        raise DatasetError(uri, [f"{uri}: no objects there"])
    files = work / "s3"
    for key in keys:
        rel = key[len(base):]
        if not rel or rel.startswith("/") or ".." in PurePosixPath(rel).parts:
            continue
        try:
            src.get_file(key, files / rel)
        except StorageError as e:
            raise DatasetError(uri, [str(e)]) from None
    if len(keys) == 1 and keys[0].endswith(".zip"):
        zip_path = files / keys[0][len(base):]
        return LocalSource(_unzip(zip_path, work / "unzipped", uri), uri)
    return LocalSource(files, uri)


def _unzip(zip_path: Path, dest: Path, label: str) -> Path:
    """Check the archive (every member's CRC) and extract it safely; returns the extraction folder."""
    name = zip_path.name if "://" not in label else label
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DatasetError(label, [f"{name}: corrupt zip (member {bad} fails its CRC check)"])
            for member in zf.infolist():
                parts = PurePosixPath(member.filename).parts
                if member.filename.startswith("/") or ".." in parts:
                    raise DatasetError(label, [f"{name}: unsafe path {member.filename!r} in zip"])
            if dest.exists():
                shutil.rmtree(dest)
            zf.extractall(dest)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise DatasetError(label, [f"{name}: not a valid zip ({e})"]) from None
    return dest
