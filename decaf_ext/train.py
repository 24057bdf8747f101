"""``python -m decaf_ext.train``: the ``decaf-train`` command line (parsing and commands live in decaf_ext.cli)."""

import sys

from decaf_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
