"""``python -m decaf_ext.distributed`` (the launcher, or one agent under torchrun): ``decaf-train --launcher dist``."""

import sys

from decaf_ext.cli.commands import main

sys.exit(main([*sys.argv[1:], "--launcher", "dist"], prog="python -m decaf_ext.distributed"))
