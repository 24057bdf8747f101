"""The ``decaf-train`` command line: parsing, the train / plot / predict commands and their report tables."""

from decaf_ext.cli.commands import main

__all__ = ["main"]
