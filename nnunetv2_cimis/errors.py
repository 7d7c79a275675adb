"""Errors a user can cause, and how commands report them.

Every error that bad input can provoke (a wrong teacher, a scenario naming an unknown class, a dataset
without step metadata, a corrupt image, ...) is raised as :class:`CIMISError` with a message that says what
is wrong and how to fix it. Command-line entry points wrap their ``main`` with :func:`cli_entry`, which
prints that message and exits with status 2 instead of showing a traceback through nnU-Net internals.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class CIMISError(Exception):
    """A problem with the user's input or setup; the message says what is wrong and how to fix it."""


def cli_entry(main: Callable) -> Callable:
    """Decorate a command's ``main`` so that a :class:`CIMISError` ends it with a message and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CIMISError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


class exit_on_user_error:
    """Context manager for code that nnU-Net's own commands call (trainer hooks).

    ``nnUNetv2_train`` is nnU-Net's command, so we cannot wrap its ``main``. Inside a trainer hook, a
    :class:`CIMISError` is turned into ``SystemExit`` carrying the message: Python prints it and exits
    with status 1, without a traceback through nnU-Net.
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, CIMISError):
            raise SystemExit(f"error: {exc}") from None
        return False
