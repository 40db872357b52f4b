"""argparse types of `sam-pipeline`'s flags: each turns a bad value into a one-line usage error."""
from __future__ import annotations

import argparse
import re

from components.errors import first_line


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


def _toleration(text: str) -> tuple[str, str] | None:
    """KEY[:EFFECT] as (key, effect), the effect NoSchedule by default; None for 'none' (drop the default)."""
    key, _, effect = text.partition(":")
    if effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"effect {effect!r}: use NoSchedule, PreferNoSchedule or NoExecute")
    return None if text == "none" else (key, effect or "NoSchedule")


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
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

