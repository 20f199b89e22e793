"""The operations HTTP endpoint: ``/healthz`` and Prometheus ``/metrics``."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from sqlalchemy import text

from cli.runtime import Runtime

LOG = logging.getLogger(__name__)

StartResponse = Callable[..., Any]


class NodeChecks(Protocol):
    """A serving node's own checks (``NodeProcess``, or its ``Ingest`` alone)."""

    def health(self) -> dict[str, str]: ...


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("http: " + format, *args)


def health(runtime: Runtime, node: NodeChecks | None = None) -> tuple[bool, dict[str, str]]:
    """Check the database answers, the archive directories are writable and, for a
    serving node, that journal checkpoints and archive writes succeed and the forwarder
    process runs."""
    checks: dict[str, str] = {}
    try:
        with runtime.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    for name, path in (("archive", runtime.files.root), ("staging", runtime.files.tmp)):
        checks[name] = "ok" if os.access(path, os.W_OK) else "error: not writable"
    if node is not None:
        checks.update(node.health())
    return not any(v.startswith("error") for v in checks.values()), checks


def make_app(
    runtime: Runtime, registry: CollectorRegistry, node: NodeChecks | None = None
) -> Callable[..., Iterable[bytes]]:
    """The WSGI application serving the two endpoints."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok, checks = health(runtime, node)
            body = json.dumps({"status": "ok" if ok else "error", **checks}).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz or /metrics\n"]

    return app


class OpsServer:
    """Serves the operations endpoint in a background thread."""

    def __init__(
        self, runtime: Runtime, host: str, port: int, node: NodeChecks | None = None
    ) -> None:
        self._server: WSGIServer = make_server(
            host, port, make_app(runtime, runtime.registry, node), handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # shutdown() waits for serve_forever() to return: it would block for ever when the
        # server was never started (serve stopping because the DICOM port is busy)
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
