"""argparse pieces of `sam-pipeline`: the flags' types (each turns a bad value into a one-line usage error),
the flag groups several commands share, the help format."""
from __future__ import annotations

import argparse
import re

from components.errors import first_line
from components.weights import MODEL_TYPES


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} must be >= {lo}")
        return value
    return parse


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N, mps)")
    return text


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key.strip(), value


def _usage(name: str):
    """An argparse type from a kfp_client parser, so its message becomes a one-line usage error."""
    def parse(text: str):
        from pipelines import kfp_client

        try:
            return getattr(kfp_client, name)(text)
        except kfp_client.UsageError as e:
            raise argparse.ArgumentTypeError(first_line(e)) from None
    parse.__name__ = name
    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default; a default of None, False or "" (a flag that is off, a
    setting whose help says what happens without it) would only add noise and is left out."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("sam-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _add_seed_flags(p: argparse.ArgumentParser) -> None:
    # Names and defaults come from TrainConfig (the one place they are stated); the short flags are the seed's.
    from components.training.config import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training (the seed's flags)")
    g.add_argument("-d", "--debug_with_one_example", action="store_true", default=d.debug_with_one_example,
                   help="train on a single example")
    g.add_argument("-c", "--checkpoint_name", default=d.checkpoint_name, help="checkpoints/<name>/{best,latest}.pt")
    g.add_argument("-m", "--model_type", default=d.model_type, choices=MODEL_TYPES,
                   help="vit_t is MobileSAM; vit_b and vit_h are SAM")
    g.add_argument("-b", "--batch_size", type=_int_at_least(1), default=d.batch_size, help="images per iteration")
    g.add_argument("-n", "--n_objects_per_batch", type=_int_at_least(1), default=d.n_objects_per_batch,
                   help="instances sampled per iteration")
    g.add_argument("-g", "--device", type=_device, default=d.device,
                   help="cuda (falls back to cpu with a notice when there is no GPU) or cpu")
    g.add_argument("-i", "--n_iterations", type=_int_at_least(1), default=d.n_iterations, help="training iterations")
    g.add_argument("-s", "--n_sub_iteration", type=_int_at_least(1), default=d.n_sub_iteration,
                   help="prompting rounds per iteration (1 + corrective rounds)")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate (a finite number > 0)")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the split and the prompt sampling (>= 0)")
    g.add_argument("--val-every", dest="val_every", type=_int_at_least(1), default=d.val_every,
                   help="validate every N iterations")


def _add_store_flags(p: argparse.ArgumentParser, *, local_default: bool) -> None:
    g = p.add_argument_group("object store")
    g.add_argument("--s3-endpoint", default=None,
                   help=("host:port of an S3 store (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); "
                         + ("default: an S3 server started on 127.0.0.1 for this run" if local_default
                            else "default: S3_ENDPOINT")))
    g.add_argument("--bucket", default="mlpipeline", help="bucket of the object store")
    g.add_argument("--prefix", default="sam-pipeline/", help="key prefix of everything stored")
