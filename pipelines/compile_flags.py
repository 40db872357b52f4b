"""`sam-pipeline compile`'s flags: everything fixed at compile time (images, GPU placement, /dev/shm, retries,
the GPU tasks' CPU and memory) and the `Placement` they make."""
from __future__ import annotations

import argparse

from pipelines import resources


def _toleration(text: str) -> tuple[str, str] | None:
    """KEY[:EFFECT] as (key, effect), the effect NoSchedule by default; None for 'none' (drop the default)."""
    key, _, effect = text.partition(":")
    if effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"effect {effect!r}: use NoSchedule, PreferNoSchedule or NoExecute")
    return None if text == "none" else (key, effect or "NoSchedule")


def _resource(kind: str):
    def parse(text: str):
        try:
            return resources.parse_flag(text, kind)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def add_flags(p: argparse.ArgumentParser, *, retries_type, key_value_type) -> None:
    """The flags, on the compile subparser (the two argument types are the CLI's own)."""
    d = resources.DEFAULTS
    p.add_argument("--registry", help="image registry (default localhost, or SAM_IMAGE_REGISTRY)")
    p.add_argument("--tag", help="image tag (default: derived from the image sources, as `make images` tags; "
                                 "or SAM_IMAGE_TAG)")
    p.add_argument("--gpu-node-selector", action="append", type=key_value_type, metavar="KEY=VALUE",
                   help="node selector for the GPU steps (repeatable; default nvidia.com/gpu.present=true; "
                        "'none' to drop)")
    p.add_argument("--gpu-toleration", action="append", type=_toleration, metavar="KEY[:EFFECT]",
                   help="toleration (operator Exists) for the GPU steps (repeatable; default "
                        "nvidia.com/gpu:NoSchedule; 'none' to drop)")
    p.add_argument("--shm-size", default="2Gi", help="memory-backed /dev/shm for finetune and evaluate")
    p.add_argument("--retries", type=retries_type, default=3, help="finetune retries (resume from latest.pt)")
    p.add_argument("--cpu", action="append", type=_resource("cpu"), metavar="TASK=REQUEST[:LIMIT]",
                   help="CPU of embed, finetune or evaluate (repeatable; defaults " +
                        ", ".join(f"{t}={r.cpu}" for t, r in d.items()) +
                        ", no limit; `make preflight` says what fits)")
    p.add_argument("--memory", action="append", type=_resource("memory"), metavar="TASK=REQUEST[:LIMIT]",
                   help="memory of embed, finetune or evaluate (repeatable; defaults " +
                        ", ".join(f"{t}={r.memory}:{r.memory_limit}" for t, r in d.items()) + ")")


def placement(args):
    """The Placement the parsed flags ask for (a bad --registry/--tag raises ImageError: exit 2)."""
    from pipelines.images import image_refs
    from pipelines.sam_finetune import Placement

    kw = {"images": image_refs(args.registry, args.tag), "shm_size": args.shm_size, "finetune_retries": args.retries,
          "resources": resources.with_flags(resources.DEFAULTS, args.cpu, args.memory)}
    if args.gpu_node_selector:
        kw["gpu_node_selector"] = {k: v for k, v in args.gpu_node_selector if k != "none"}
    if args.gpu_toleration:
        kw["gpu_tolerations"] = tuple(t for t in args.gpu_toleration if t is not None)
    return Placement(**kw)
