"""Checking the Python API's arguments: each bad value becomes one EdgediffError line that names the
argument, what it got and what it takes, before any work is done.

Written by hand because the rules are few and the messages are the point: numpy integers are whole
numbers (arrays and config files hand them out), booleans are not (`steps=True` is a mistake, though
Python calls True an int), numbers given as strings are refused rather than guessed at, and NaN or
infinity never passes for a number.
"""

from __future__ import annotations

import math
import numbers

from .errors import EdgediffError, EdgediffTypeError


def whole(name: str, value, minimum: int, maximum: int | None = None, hint: str = "") -> int:
    """`value` as an int in [minimum, maximum]: a Python or numpy integer, never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise EdgediffTypeError(f"{name} must be a whole number, not {_show(value)}{hint}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise EdgediffError(f"{name} must be {bounds}, not {value}{hint}")
    return value


def real(name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a finite float in [minimum, maximum]: any real number type, never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EdgediffTypeError(f"{name} must be a number, not {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise EdgediffError(f"{name} must be a finite number, not {value}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"from {minimum:g} to {maximum:g}" if minimum is not None and maximum is not None
                  else f"at least {minimum:g}" if minimum is not None else f"at most {maximum:g}")
        raise EdgediffError(f"{name} must be {bounds}, not {value:g}")
    return value


def texts(name: str, value) -> list[str]:
    """A prompt argument (one string or a non-empty list of strings) as a list of valid text."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(t, str) for t in items):
        hint = "; decode bytes first (text.decode('utf-8'))" if _holds_bytes(value) else ""
        raise EdgediffTypeError(f"{name} must be a string or a non-empty list of strings, not "
                                f"{_show(value)}{hint}")
    for text in items:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            # What Python makes of command-line bytes that are not UTF-8 (lone surrogates): the
            # tokenizer and the PNG's text chunk could not carry them.
            raise EdgediffError(f"{name} is not valid UTF-8 text (a stray byte at character {e.start}); "
                                "save it as UTF-8 or remove the character") from None
    return list(items)


def _holds_bytes(value) -> bool:
    return isinstance(value, (bytes, bytearray)) or (
        isinstance(value, (list, tuple)) and any(isinstance(t, (bytes, bytearray)) for t in value))


def _show(value) -> str:
    """A short description of a bad value: its type, and the value where that is short."""
    kind = type(value).__name__
    text = repr(value)
    if "\n" in text or len(text) > 40:
        return kind
    return f"{kind} {text}"
