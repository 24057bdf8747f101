"""User errors: the exception every user mistake becomes, and the one line it is shown as."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line and names the offending argument."""


def root_cause(error: BaseException) -> BaseException:
    """The exception at the end of `error`'s `raise ... from` chain (where a library wraps the real reason)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
