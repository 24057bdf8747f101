"""Third-party noise kept off the terminal: transformers' load reports and notices, datasets' progress bars.

Each helper is a context manager that restores the libraries' settings on exit, so the Python API stays quiet
without changing a user's own logging configuration for good.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers at error verbosity (no load report, no hub progress bar) and FutureWarnings ignored inside."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No datasets progress bars ("Generating train split", downloads) and no logs below CRITICAL inside: its
    errors arrive as exceptions, which the callers turn into one-line messages."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
