"""The one exception type that reaches users: its message is a single line naming the problem and what to
do about it. The CLI prints it as `edgediff: error: ...` and exits 2; library users catch it (it is a
ValueError, so code written for diffusers' argument errors keeps working).

`EdgediffTypeError` is the same error for an argument of the wrong type (a prompt that is a number, a
callback that cannot be called): it is also a TypeError, which is what Python code expects then.

`first_line` and `quiet` keep the rest of what users read short: another library's message cut to one
line, another library's logger held to its errors.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator


class EdgediffError(ValueError):
    pass


class EdgediffTypeError(EdgediffError, TypeError):
    pass


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line for ours (a library's may run to a page), or its type's
    name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


@contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """Only errors from the logger `logger_name` (and the loggers under it) while inside: a library's
    notes that mean nothing to our users. Its level is restored afterwards."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
