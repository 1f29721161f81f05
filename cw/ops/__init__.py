"""Operating a cluster: the status command and command jobs (``cw.command``)."""
