"""``python -m tokenchat``: the same as the ``tokenchat`` command."""

import sys

from tokenchat.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
