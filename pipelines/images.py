"""Container image references for the five steps, from one place.

`base_image` is fixed when a component is decorated, so the pipeline is built through
`make_components(images)` and these references can be overridden at compile time (registry, tag).
The defaults suit `kind load docker-image`: kind nodes resolve `localhost/...` from what was loaded. The
default tag is derived from what goes into the images (pipelines/image_tag.py), so a rebuilt image gets a new
tag and KFP's cache, keyed on the image reference, never hands back a stale image's results.
"""
from __future__ import annotations

import os
import re

from components.errors import UserError
from components.kfp_components import STEPS
from pipelines.image_tag import source_tag

# Each step's image installs the project with this pyproject extra (build argument EXTRA).
EXTRAS = {"fetch-weights": "weights", "ingest-dataset": "ingest", "finetune": "train", "evaluate": "train",
          "register-model": "registry"}
# Steps built from images/torch/Dockerfile (and run on the GPU node); the rest use images/light/Dockerfile.
TORCH_STEPS = ("finetune", "evaluate")
IMAGE_PREFIX = "sam-pipeline-"
DEFAULT_REGISTRY = "localhost"
# Only where there is no source tree to hash (the package installed in an image): its version.
FALLBACK_TAG = "0.1.0"

# Docker reference grammar, simplified: a tag is [\w][\w.-]{0,127}; a registry/namespace has no spaces.
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_REGISTRY = re.compile(r"^[a-z0-9]([a-z0-9._:/-]*[a-z0-9])?$")


class ImageError(UserError, ValueError):
    """A bad registry or tag, reported in one line; the CLI exits 2 (a usage error)."""

    exit_code = 2


def image_name(step: str) -> str:
    if step not in STEPS:
        raise ImageError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    return IMAGE_PREFIX + step


def image_kind(step: str) -> str:
    """"torch" or "light": the folder under images/ whose Dockerfile builds the step's image."""
    image_name(step)
    return "torch" if step in TORCH_STEPS else "light"


def default_tag() -> str:
    return source_tag() or FALLBACK_TAG


def image_refs(registry: str | None = None, tag: str | None = None) -> dict[str, str]:
    """{step: "<registry>/sam-pipeline-<step>:<tag>"}; None falls back to SAM_IMAGE_REGISTRY/SAM_IMAGE_TAG,
    then to the kind-friendly registry and the tag derived from the sources."""
    registry = (registry or os.environ.get("SAM_IMAGE_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")
    tag = tag or os.environ.get("SAM_IMAGE_TAG") or default_tag()
    if not _REGISTRY.match(registry):
        raise ImageError(f"invalid image registry {registry!r} (expected e.g. localhost or ghcr.io/org)")
    if not _TAG.match(tag):
        raise ImageError(f"invalid image tag {tag!r} (letters, digits, '_', '.', '-'; at most 128)")
    return {step: f"{registry}/{image_name(step)}:{tag}" for step in STEPS}


def main() -> None:
    """`python -m pipelines.images [registry] [tag]`: print `step image` lines for build scripts."""
    import sys

    refs = image_refs(*(sys.argv[1:3]))
    for step, ref in refs.items():
        print(step, ref)


if __name__ == "__main__":
    main()
