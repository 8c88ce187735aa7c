"""``python -m pagetable``: the same command line as the ``pagetable`` console script."""

import sys

from pagetable.cli import main

if __name__ == "__main__":
    sys.exit(main())
