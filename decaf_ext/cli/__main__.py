"""``python -m decaf_ext.cli``: the ``decaf-train`` command line."""

import sys

from decaf_ext.cli.commands import main

sys.exit(main())
