"""`sam-pipeline predict`: argparse and printing only; the work is components/predict.py."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

EXAMPLE = """\
worked example (a local run registered the model "sam-pennfudan"; boxes from a COCO export):

  sam-pipeline run --demo                                  # train and register a model locally
  sam-pipeline predict --model sam-pennfudan \\
      --images my_export/images --prompts my_export/annotations.json --output predictions/
  # predictions/masks/<image>.png      instance ids (0 = background, 1..N)
  # predictions/predictions.json       COCO results: RLE masks, bbox, score = SAM's predicted IoU
  # predictions/overlays/<image>.png   the masks drawn over the image

  sam-pipeline predict --checkpoint my_model.pt \\
      -m vit_t --images photos/ --boxes boxes.txt --output out/  # boxes.txt: "photo1.jpg 10 20 200 300"
  sam-pipeline predict --checkpoint ~/.sam_models/vit_t.pt --images photos/ --output out/  # no prompts:
      # SAM's automatic mask generator over the whole image
"""


def add_parser(sub, add_store_flags) -> None:
    from components.weights import MODEL_TYPES

    p = sub.add_parser("predict", help="segment images with a registered model or a checkpoint file",
                       description="Segment images; writes instance-id PNGs, a COCO results JSON and overlays.",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", metavar="NAME[:VERSION]",
                       help="a registered version (default: the latest) from the store, or from "
                            "the store of --pipeline-root's local runs when no store is given")
    model.add_argument("--checkpoint", type=Path, help="a SAM state-dict file (with -m for its model type)")
    p.add_argument("-m", "--model-type", "--model_type", dest="model_type", default="vit_t", choices=MODEL_TYPES,
                   help="model type of --checkpoint (a registered model's card names its own)")
    p.add_argument("--images", type=Path, required=True, help="an image file or a folder of images")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", type=Path, metavar="COCO_JSON",
                         help="box prompts: each annotation's bbox in a COCO JSON, matched by file_name")
    prompts.add_argument("--boxes", type=Path, metavar="FILE",
                         help="box prompts: lines 'file x0 y0 x1 y1 [category_id]' (pixels)")
    p.add_argument("--output", type=Path, required=True, help="a new (or empty) folder for the outputs")
    p.add_argument("-g", "--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    p.add_argument("--batch-size", type=int, default=4, help="images per image-encoder call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"),
                   help="where `sam-pipeline run` keeps its local store (used by --model without a store)")
    add_store_flags(p, local_default=False)
    p.set_defaults(func=cmd_predict)


@contextlib.contextmanager
def _registry_store(args):
    """The store --model reads: --s3-endpoint/S3_ENDPOINT, else the store the local runs of --pipeline-root keep
    (the same registry code reads both)."""
    from components.steps import connect
    from components.storage import ObjectStore

    endpoint = args.s3_endpoint or os.environ.get("S3_ENDPOINT")
    if endpoint:
        yield connect(endpoint, args.bucket, args.prefix)
        return
    from pipelines.local_store import shared_store

    with shared_store(args.pipeline_root, bucket=args.bucket, prefix=args.prefix) as cfg:
        yield ObjectStore(cfg)


def cmd_predict(args) -> int:
    from components import predict as P

    if args.prompts:
        prompts = P.prompts_from_coco(args.prompts, args.images)
    elif args.boxes:
        prompts = P.prompts_from_boxes_file(args.boxes, args.images)
    else:
        prompts = P.prompts_automatic(args.images)
    with tempfile.TemporaryDirectory(prefix="sam-predict-") as tmp:
        if args.model:
            with _registry_store(args) as store:
                checkpoint, model_type, label = P.fetch_registered(store, args.model, Path(tmp))
        else:
            checkpoint, model_type, label = args.checkpoint, args.model_type, str(args.checkpoint)
        model = P.load_model(checkpoint, model_type, args.device)
        print(f"sam-pipeline: predicting with {label} ({model_type}) on {next(model.parameters()).device}",
              file=sys.stderr)
        summary = P.predict(model, prompts, args.output, batch_size=max(1, args.batch_size),
                            progress=not args.no_progress)
    print(json.dumps({"model": label, **summary}, indent=2, sort_keys=True))
    return 0
