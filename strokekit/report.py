"""Headline figures of a notebook run, collected for the course report of ``make run``.

A notebook states what it found in one cell, e.g.
``report.record(watched_val_dice=0.71, grid_configs_learned=7)``. Under ``make run`` the runner
points ``STROKEKIT_FIGURES`` at a file of its own for each notebook and copies the figures into
``build/notebooks/summary.json``; in Jupyter or under nbval that variable is unset and ``record``
only checks and returns the figures.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

import numpy as np

from .runs import write_json

#: Environment variable naming the JSON file that :func:`record` merges figures into.
FIGURES_ENV = "STROKEKIT_FIGURES"
#: Longest string a figure may be (figures are printed on one line of the run's table).
MAX_STRING = 80


def record(**figures) -> dict:
    """Record headline figures of this notebook (written only when ``STROKEKIT_FIGURES`` is set).

    Args:
        **figures: name=value pairs. A value is a finite number (Python or NumPy int/float), a bool,
            or a string of at most ``MAX_STRING`` characters. A later call with the same name
            replaces the value.

    Returns:
        the figures as recorded: NumPy scalars turned into Python ``int``/``float``/``bool``.

    Raises:
        ValueError: a value is not one of the above (the message names its key); nothing is written.
    """
    clean = {key: _figure(key, value) for key, value in figures.items()}
    path = os.environ.get(FIGURES_ENV)
    if path and clean:
        path = Path(path)
        merged = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        merged.update(clean)
        write_json(path, merged)
    return clean


def _figure(key: str, value):
    """``value`` as a JSON-ready bool, int, float or short str, or a ValueError naming ``key``."""
    if isinstance(value, (bool, np.bool_)):  # before Integral: a bool is an int
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"figure {key!r} must be a finite number. Received: {key}={value}")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueError(f"figure {key!r} is a string of {len(value)} characters; "
                             f"at most {MAX_STRING} fit the report")
        return value
    raise ValueError(f"figure {key!r} must be a number, a bool or a short string. "
                     f"Received: {key}={value!r:.60} of type {type(value).__name__} "
                     "(for an array or tensor, pass float(...) of a single value)")
