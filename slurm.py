#!/usr/bin/env python3
"""Start, inspect and stop a cw cluster on SLURM: ``./slurm.py start -n 8``.
The same as ``python -m cw.slurm``; see cw/slurm.py."""
import sys

from cw.launch.slurm import main

if __name__ == "__main__":
    sys.exit(main())
