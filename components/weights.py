"""fetch-weights: the SAM/MobileSAM checkpoint catalogue, verified download, local and object-store cache.

Lookup order: local cache (`~/.sam_models/`, SAM_MODELS overrides), then the object store
(`weights/<model_type>/<sha256>/<file>`, so an air-gapped cluster works once weights are staged), then
the URL. Every hit is re-verified (size and sha256); a corrupt file is fetched again, never used.

An unpinned URL (no sha256) can only be checked by what it serves: a cached copy is fetched again when
the URL now announces a different size (HEAD), or when the copy does not load as a checkpoint; a
download that is not a checkpoint (a login page, an HTML error) is refused and never cached.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from components.download import DownloadError, download, remote_size
from components.files import Discard, atomic_path, unique_temp
from components.hashing import sha256_file
from components.storage import ObjectStore


class WeightsError(DownloadError):
    """A one-line weights failure (a DownloadError, so callers can catch both as one)."""


@dataclass(frozen=True)
class Checkpoint:
    model_type: str
    url: str
    bytes: int
    sha256: str
    filename: str


CATALOGUE: dict[str, Checkpoint] = {c.model_type: c for c in (
    Checkpoint("vit_t", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
               40_728_226, "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
               "vit_t_mobile_sam.pth"),
    Checkpoint("vit_b", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
               375_042_383, "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
               "vit_b_sam_vit_b_01ec64.pth"),
    Checkpoint("vit_h", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
               2_564_550_879, "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
               "vit_h_sam_vit_h_4b8939.pth"),
)}
# The one list of model types (like segment-anything's sam_model_registry): the CLI and TrainConfig read it.
MODEL_TYPES = tuple(CATALOGUE)


@dataclass
class FetchResult:
    model_type: str
    path: Path
    sha256: str
    bytes: int
    source_url: str
    object_uri: str | None
    origin: str  # "local-cache" | "object-store" | "download": where this call found the file

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def models_dir() -> Path:
    return Path(os.environ.get("SAM_MODELS") or "~/.sam_models").expanduser()


def writable_models_dir(cache_dir: str | Path | None = None, *, create: bool = True) -> Path:
    """The weights cache, writable (and created unless `create=False`), or one line saying which folder and
    how to move it."""
    from components.files import writable_dir

    return writable_dir(Path(cache_dir).expanduser() if cache_dir else models_dir(),
                        "the weights cache (checkpoints are kept there)", "set SAM_MODELS to a writable folder",
                        create=create)


def _entry(model_type: str) -> Checkpoint:
    try:
        return CATALOGUE[model_type]
    except KeyError:
        raise WeightsError(f"unknown model type {model_type!r}; choose one of {', '.join(CATALOGUE)}") from None


def cache_name(entry: Checkpoint, sha256: str) -> str:
    # Only the catalogue's own file gets the catalogue's name: anything else is named by its sha256,
    # so a mirror's different file can never be mistaken for the official checkpoint.
    return entry.filename if sha256 == entry.sha256 else f"{entry.model_type}_{sha256}.pth"


# What torch.save's pre-1.6 (non-zip) format starts with: the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_MEMO_OPS = {"PROTO", "FRAME", "BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"}


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a PyTorch checkpoint holding a dict (a state dict or a dict around one), or None.

    Read without torch (the fetch-weights image has none) and without unpickling anything: torch.save
    writes a zip whose one `<name>/data.pkl` starts with the top-level object, a dict (`}`) or an
    OrderedDict (`collections OrderedDict`) for a state dict. A file in torch's pre-1.6 format is
    recognised by its magic number alone. (torch/serialization.py: `_save`, `_legacy_save`.)"""
    import pickletools
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                legacy = f.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC
            return None if legacy else "not a PyTorch checkpoint"
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            ops = [(op.name, arg) for op, arg, _ in pickletools.genops(z.read(pkl[0]))
                   if op.name not in _MEMO_OPS] if len(pkl) == 1 else []
    except (zipfile.BadZipFile, OSError, ValueError):  # ValueError: a damaged pickle
        return "not a PyTorch checkpoint"
    if not ops:
        return "not a PyTorch checkpoint"
    first, arg = ops[0]
    if first != "GLOBAL" and len(ops) > 2 and ops[2][0] == "STACK_GLOBAL":  # pickle protocol 4 and later
        first, arg = "GLOBAL", f"{ops[0][1]} {ops[1][1]}"
    if first == "EMPTY_DICT" or (first, arg) == ("GLOBAL", "collections OrderedDict"):
        if any(name in ("SETITEM", "SETITEMS") for name, _ in ops):
            return None
        return "not a checkpoint (a PyTorch file holding an empty dict)"
    held = {"EMPTY_LIST": "list", "EMPTY_TUPLE": "tuple", "EMPTY_SET": "set"}.get(first, "no dict")
    if first == "GLOBAL":
        held = "Tensor" if "_rebuild_tensor" in arg else arg.split()[-1]
    return f"not a checkpoint (a PyTorch file holding {held}, not a dict of tensors)"


def _verified(path: Path, sha256: str, size: int | None) -> bool:
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    return sha256_file(path) == sha256


class _SourceIndex:
    """url -> sha256 of what an unpinned URL served last time, so a second call finds its cache entry."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / "sources.json"

    def get(self, url: str) -> str | None:
        try:
            return json.loads(self.path.read_text()).get(url)
        except (OSError, ValueError):
            return None

    def set(self, url: str, sha256: str) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        data[url] = sha256
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def fetch_weights(model_type: str, url: str | None = None, sha256: str | None = None,
                  cache_dir: str | Path | None = None, store: ObjectStore | None = None) -> FetchResult:
    """Return a verified local checkpoint, fetching it only when neither cache has it.

    url: a mirror URL or a local file (default: the catalogue's). sha256: pins the file; without it a
    custom URL is trusted as served and its sha256 is computed and reported.
    """
    entry = _entry(model_type)
    url = url or entry.url
    pinned = sha256.lower() if sha256 else (entry.sha256 if url == entry.url else None)
    size = entry.bytes if pinned == entry.sha256 else None
    cache_dir = writable_models_dir(cache_dir)
    index = _SourceIndex(cache_dir)
    known = pinned or index.get(url)

    path, origin = None, "download"
    if known:
        candidate = cache_dir / cache_name(entry, known)
        if _verified(candidate, known, size):
            path, origin = candidate, "local-cache"
        else:
            candidate.unlink(missing_ok=True)  # corrupt or truncated: fetch again
        if path is None and store is not None:
            path = _from_store(store, entry, known, size, candidate)
            origin = "object-store" if path else origin
        if path is not None and not pinned and _stale_unpinned(path, url):
            path.unlink(missing_ok=True)
            path, origin = None, "download"
    if path is None:
        # download() writes atomically; the file's name in the cache is its sha256, known only once it is
        # in, so it lands under a temp name first and moves to its content name after the checks.
        incoming = unique_temp(cache_dir / model_type, "incoming")
        try:
            actual = download(url, incoming, sha256=pinned, size=size, desc=f"{model_type} weights")
            # The catalogue's own pinned file is known good; anything else must at least load.
            problem = None if actual == entry.sha256 else checkpoint_problem(incoming)
            if problem:
                raise WeightsError(f"{model_type} weights: {url} served a file that is {problem} "
                                   f"({incoming.stat().st_size} bytes, sha256 {actual}); check the URL")
        except DownloadError as e:
            incoming.unlink(missing_ok=True)
            if isinstance(e, WeightsError):
                raise
            raise WeightsError(f"{model_type} weights: {e}") from None
        path = cache_dir / cache_name(entry, actual)
        os.replace(incoming, path)
        if not pinned:
            index.set(url, actual)
        known = actual

    object_uri = _to_store(store, entry, known, path) if store is not None else None
    return FetchResult(model_type, path, known, path.stat().st_size, url, object_uri, origin)


def _stale_unpinned(path: Path, url: str) -> bool:
    """A cached copy of an unpinned URL that must be fetched again: the URL now serves another size, or
    the copy does not load as a checkpoint (an earlier version cached whatever the URL served)."""
    served = remote_size(url)
    return (served is not None and served != path.stat().st_size) or checkpoint_problem(path) is not None


def _key(store: ObjectStore, entry: Checkpoint, sha256: str) -> str:
    return store.key("weights", entry.model_type, sha256, cache_name(entry, sha256))


def _from_store(store: ObjectStore, entry: Checkpoint, sha256: str, size: int | None, dest: Path) -> Path | None:
    key = _key(store, entry, sha256)
    info = store.stat(key)
    if info is None or (size is not None and info.size != size):
        return None
    with atomic_path(dest, tag="from-store") as tmp:
        # get_file checks the bytes against the object's recorded sha256 (hashing 2.5 GB of vit_h once
        # is enough); hash again only for an object written without one.
        got = store.get_file(key, tmp).sha256
        if (got or sha256_file(tmp)) != sha256 or (size is not None and tmp.stat().st_size != size):
            raise Discard  # a damaged object is replaced by the download that follows
        return dest  # moved into place as the block ends
    return None


def _to_store(store: ObjectStore, entry: Checkpoint, sha256: str, path: Path) -> str:
    key = _key(store, entry, sha256)
    info = store.stat(key)
    if info is None or info.sha256 != sha256 or info.size != path.stat().st_size:
        store.put_file(key, path, sha256)
    return store.uri(key)
