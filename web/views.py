"""Views every role serves: /health here, /metrics from Faust's Prometheus sensor (pipeline.app)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError
from faust.web import Request, Response, View

from pipeline.broker_security import client_options

if TYPE_CHECKING:
    from pipeline.app import DocflowApp

BROKER_CHECK_SECONDS = 3.0


class BrokerProbe:
    """One long-lived metadata client, so a health check costs one request, not a new connection."""

    def __init__(self, bootstrap_servers: str, **options) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.options = options  # security: pipeline.broker_security.client_options
        self._client: AIOKafkaClient | None = None

    async def reachable(self) -> bool:
        try:
            if self._client is None:
                client = AIOKafkaClient(
                    bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000, **self.options
                )
                await asyncio.wait_for(client.bootstrap(), BROKER_CHECK_SECONDS)
                self._client = client
            await asyncio.wait_for(self._client.fetch_all_metadata(), BROKER_CHECK_SECONDS)
            return True
        except (TimeoutError, KafkaError, OSError):
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def register_common(app: DocflowApp) -> None:
    probe = BrokerProbe(app.settings.bootstrap_servers, **client_options(app.settings))

    @app.on_before_shutdown.connect
    async def close_probe(app_, **kwargs) -> None:
        await probe.close()

    @app.page("/health")
    class Health(View):
        """200 when the broker answers and the role's state is recovered, else 503 with the reason."""

        async def get(self, request: Request) -> Response:
            broker = await probe.reachable()
            recovered = app.tables.recovery.completed.is_set() if app.status_table is not None else True
            assigned: dict[str, list[int]] = {}
            for tp in app.consumer.assignment():
                assigned.setdefault(tp.topic, []).append(tp.partition)
            checks = {
                "broker": "ok" if broker else "unreachable",
                "table": "recovered" if recovered else "recovering",
                "rebalancing": bool(app.rebalancing),
                "assigned": {topic: sorted(partitions) for topic, partitions in sorted(assigned.items())},
            }
            keys_loaded = app.gate is None or app.gate.keys_loaded.is_set()
            lifecycle_loaded = app.lifecycle.caught_up.is_set()
            checks["lifecycle"] = "loaded" if lifecycle_loaded else "loading"
            if app.gate is not None and app.gate.required:
                checks["keys"] = "loaded" if keys_loaded else "loading"
            ready = broker and recovered and keys_loaded and lifecycle_loaded
            return self.json(
                {"status": "ok" if ready else "unavailable", "role": app.role, "checks": checks},
                status=200 if ready else 503,
            )
