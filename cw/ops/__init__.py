"""Operating a cluster: status, runtime installs, command jobs, progress."""
