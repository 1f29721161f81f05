"""The dashboard: a separate process that watches a master as a client and
serves a live page, Prometheus metrics and a REST API for command jobs
(``cw dashboard``; needs the ``dashboard`` extra: aiohttp, prometheus_client).
See cw.dashboard.app."""
