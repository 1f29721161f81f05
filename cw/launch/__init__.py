"""Launching clusters: local processes (``cw.allocate``) and SLURM (``slurm.py start``)."""
