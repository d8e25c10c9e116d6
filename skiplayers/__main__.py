"""``python -m skiplayers ...``: the same command line as the ``skiplayers`` script (skiplayers/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
