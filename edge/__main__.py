"""``python -m edge``: see :mod:`edge.cli`. ``main`` is also the ``fillmask-edge`` console script."""

import sys

from edge.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
