"""Errors caused by the user's input, and how entry points report them.

Every error a user can fix (a bad option, a missing file or weight, an unreadable image, a corrupt bitstream)
derives from :class:`UserError`. Entry points wrap ``main`` in :func:`exit_on_user_error`, which prints such an
error as one line and exits non-zero, without a traceback from deep inside a library.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable


class UserError(Exception):
    """A problem with the user's input; the message is one line naming the file, key or value at fault."""


class OptionsError(UserError, ValueError):
    """A problem with an option file or a ``--set`` override."""


class ModelZooError(UserError, FileNotFoundError):
    """The local diffusers-layout model folder is missing or incomplete."""


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``main`` print a :class:`UserError` as ``error: ...`` (a line each for several) and exit with status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            for line in str(err).splitlines() or [""]:  # several problems: one error line each
                print(f"error: {line}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
