"""Entry point: ``python -m mochi_retrieval.eval --help``."""

import sys

from mochi_retrieval.eval.cli import main

sys.exit(main())
