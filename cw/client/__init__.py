"""Clients: ``ClusterExecutor`` (concurrent.futures) and ``ClientThread`` (callbacks)."""
from cw.client.executor import (
    ENV_MASTER,
    ClientThread,
    ClusterExecutor,
    ClusterFuture,
    WorkerDescription,
    WorkerInfo,
    get_executor,
    resolve_master,
)

__all__ = ["ENV_MASTER", "ClientThread", "ClusterExecutor", "ClusterFuture", "WorkerDescription", "WorkerInfo",
           "get_executor", "resolve_master"]
