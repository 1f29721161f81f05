"""``python -m cw``: the ``cw`` command (see cw.cli)."""
import sys

from cw.cli import main

sys.exit(main())
