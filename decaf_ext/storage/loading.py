"""Reading what a run or a user saved: a run's JSON files (config.json, a checkpoint's state.json) and a YAML
file of options; anything unreadable is a ConfigError naming the file, one line.

Example::

    >>> load_yaml("experiment.yaml")
    {'algorithm': 'decaf', 'agents': 10}
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from decaf_ext.errors import ConfigError, first_line


def load_saved(path: str) -> dict[str, Any]:
    """A JSON file a run saved (its config.json, a checkpoint's state.json); ConfigError naming resume and the
    file if it cannot be read (missing, truncated, overwritten)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"resume: cannot read {path!r} ({first_line(error)})") from None


def load_yaml(path: str) -> dict[str, Any]:
    """Options mapping read from a YAML file (ConfigError if unreadable or malformed)."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"config: cannot read {path!r} ({error.strerror})") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config: {path!r} is not valid YAML{at}") from None
    return {} if values is None else values
