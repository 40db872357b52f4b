"""The default image tag: a hash of everything that goes into the five images.

KFP's cache key holds a task's image reference, not its digest (kubeflow/pipelines 2.17.0
backend/src/v2/cacheutils/cache.go, `GenerateCacheKey`: the container's image string), so a rebuilt image under
an old tag would reuse the stale cached results of fetch-weights and embed. A tag derived from the Dockerfiles
(base image digests), pyproject.toml (the pins and extras) and the sources they copy changes whenever an image
would. Standard library only: `make` calls `python3 -m pipelines.image_tag` before any venv exists.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What images/{light,torch}/Dockerfile COPY, and the Dockerfiles and ignore files themselves.
INPUTS = ("pyproject.toml", "README.md", "components", "pipelines", "images")
# Left out of the images by their .dockerignore (and the compiled YAML names the tag: it cannot be hashed).
SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = (".pyc", ".egg-info")
COMPILED = Path("pipelines/sam_finetune.yaml")
PREFIX = "src-"


def image_inputs(root: Path = ROOT) -> list[Path]:
    """The files whose bytes decide the tag, relative to `root`, sorted."""
    files = []
    for name in INPUTS:
        top = root / name
        candidates = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in candidates:
            rel = path.relative_to(root)
            if (path.is_file() and rel != COMPILED and not path.name.endswith(SKIPPED_SUFFIXES)
                    and not SKIPPED_DIRS & set(rel.parts) and not any(p.endswith(".egg-info") for p in rel.parts)):
                files.append(rel)
    return sorted(files)


def source_tag(root: Path = ROOT) -> str | None:
    """`src-<12 hex>` for a source checkout; None where there is none (the package installed in an image)."""
    if not (root / "pyproject.toml").is_file() or not (root / "images").is_dir():
        return None
    digest = hashlib.sha256()
    for rel in image_inputs(root):
        digest.update(rel.as_posix().encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return PREFIX + digest.hexdigest()[:12]


if __name__ == "__main__":
    tag = source_tag()
    if tag is None:
        sys.exit(f"pipelines/image_tag.py: no source checkout at {ROOT} (pyproject.toml, images/); pass IMAGE_TAG")
    print(tag)
