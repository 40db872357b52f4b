"""The one root of user-facing errors.

Anything raised as a `UserError` is a problem with the user's input or environment (a bad flag, an
unreachable store, a damaged dataset): the CLI prints it as one line (or, for a list of problems, one line
per problem) and exits non-zero. Every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A failure the user can act on; its message is complete without a traceback."""

    exit_code = 1


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name: how causes are quoted."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
