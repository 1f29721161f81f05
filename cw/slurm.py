"""``cw.slurm``: SLURM clusters from Python (``cw.slurm.start(8)``) and
``python -m cw.slurm``; the code is cw.launch.slurm (kept here by its old name)."""
import sys

from cw.launch.slurm import main, master_address, master_host, start, status, stop

__all__ = ["main", "master_address", "master_host", "start", "status", "stop"]

if __name__ == "__main__":
    sys.exit(main())
