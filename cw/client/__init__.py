"""Clients: ``ClusterExecutor`` (concurrent.futures) and ``ClientThread`` (callbacks).

executor.py holds the executor, future.py its futures, callback.py the
callback client, everyworker.py the calls that reach every worker, and
discovery.py how a client finds the master.
"""
from cw.client.callback import ClientThread
from cw.client.discovery import ENV_MASTER, resolve_master
from cw.client.executor import ClusterExecutor, get_executor
from cw.client.future import ClusterFuture, WorkerDescription, WorkerInfo

__all__ = ["ENV_MASTER", "ClientThread", "ClusterExecutor", "ClusterFuture", "WorkerDescription", "WorkerInfo",
           "get_executor", "resolve_master"]
