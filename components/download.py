"""Verified downloads: stream to a temp file beside the target, check size and sha256, then rename.

A failed or interrupted download never leaves a file where a cache would find it.
"""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from components.errors import UserError
from components.files import atomic_path

_CHUNK = 1 << 20


class DownloadError(UserError, RuntimeError):
    """A one-line, user-facing download failure."""


def _open(url: str, timeout: float):
    """Return (stream, total bytes or None) for an http(s)/file URL or a local path."""
    if "://" not in url:
        path = Path(url).expanduser()
        if not path.is_file():
            raise DownloadError(f"{url}: no such file")
        return open(path, "rb"), path.stat().st_size
    try:
        resp = urllib.request.urlopen(urllib.request.Request(
            url, headers={"User-Agent": "sam-pipeline"}), timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url} is unreachable ({reason}); no internet here? "
                            "Pass a local file or a mirror URL instead") from None
    length = resp.headers.get("Content-Length")
    return resp, int(length) if length and length.isdigit() else None


def remote_size(url: str, timeout: float = 10.0) -> int | None:
    """The size an http(s) URL would serve now (HEAD, Content-Length), or None when it cannot tell
    (a local path, no Content-Length, unreachable: callers then keep what they have)."""
    if not url.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(
                url, method="HEAD", headers={"User-Agent": "sam-pipeline"}), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return int(length) if length and length.isdigit() else None


def download(url: str, dest: str | Path, *, sha256: str | None = None, size: int | None = None,
             desc: str | None = None, timeout: float = 30.0) -> str:
    """Fetch url into dest (atomically) and return its sha256; raises DownloadError."""
    dest = Path(dest)
    stream, total = _open(url, timeout)
    h = hashlib.sha256()
    written = 0
    try:
        with stream, atomic_path(dest) as tmp:
            with open(tmp, "wb") as out, tqdm(
                    total=total or size, unit="B", unit_scale=True, desc=desc or dest.name,
                    disable=None, leave=False) as bar:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            if total is not None and written != total:
                raise DownloadError(f"{url}: connection closed after {written} of {total} bytes")
            if size is not None and written != size:
                raise DownloadError(f"{url}: size mismatch: expected {size} bytes, got {written}")
            actual = h.hexdigest()
            if sha256 is not None and actual != sha256.lower():
                raise DownloadError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {actual}")
        return actual
    except OSError as e:
        raise DownloadError(f"{url}: download failed ({e})") from None
