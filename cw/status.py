"""``python -m cw.status``: kept for the command line; the code is cw.ops.status."""
import sys

from cw.ops.status import main

if __name__ == "__main__":
    sys.exit(main())
