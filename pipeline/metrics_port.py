"""/metrics on a port of its own (DOCFLOW_METRICS_PORT), as seed 000 lays its services out:
the chunker's metrics on :8001, the embedder's on :8002.

Every role already serves /metrics on its Faust web port. This serves the same registry
(docflow's metrics and Faust's sensor, all in prometheus_client's default registry) from a
second aiohttp site on the worker's own loop. The app starts it before its consumer and
producer, so it answers while the worker is still joining its group or recovering a table,
and a port already taken stops the worker at start instead of leaving it unscraped.
"""

from __future__ import annotations

from aiohttp import web
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


class MetricsPort(Service):
    """An HTTP server with one route, ``GET /metrics``: the registry in Prometheus's text format."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY, **kwargs) -> None:
        super().__init__(**kwargs)
        self.host = host
        self.port = port
        self.registry = registry
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        server = web.Application()
        server.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(server, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.log.info("serving /metrics on http://%s:%s", self.host, self.port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
