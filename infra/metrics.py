"""Prometheus metrics: each service defines its own; this serves them over HTTP."""

from __future__ import annotations

from prometheus_client import start_http_server


def serve(port: int | None, addr: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` on ``addr:port`` (no-op when port is None or 0)."""
    if port:
        start_http_server(port, addr=addr)
