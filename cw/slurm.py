"""``python -m cw.slurm``: kept for the command line; the code is cw.launch.slurm."""
import sys

from cw.launch.slurm import main

if __name__ == "__main__":
    sys.exit(main())
