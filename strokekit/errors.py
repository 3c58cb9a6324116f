"""Errors the kit raises on bad input. Each names the file (when there is one) and the problem."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad or inconsistent input data.

    Args:
        message: what is wrong, in plain words.
        path: the file or folder concerned, if any; it leads the message.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


def expected_one_of(value, choices, arg: str) -> ValueError:
    """The error for an argument outside its choices (Keras' wording): raise it, e.g.
    ``raise expected_one_of(arch, ARCHS, "arch")``."""
    return ValueError(f"Expected one of {list(choices)}. Received: {arg}={value!r}")
