"""``python -m prance``: the same command line as the ``prance`` console script."""

import sys

from prance.cli import main

if __name__ == "__main__":
    sys.exit(main())
