"""Who is calling: a company's API key, checked on every API request, and how often it may.

With ``DOCFLOW_AUTH=required`` the company comes from the key (``Authorization: Bearer``
or ``X-API-Key``), and an ``X-Company-ID`` or ``company_id`` that names another company is
403. With auth off (only allowed on a loopback address) the company is the one the request
names, or ``DOCFLOW_DEFAULT_COMPANY_ID`` when it names none. docs/architecture.md ("Trust
boundary") has the whole picture.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp_cors import ResourceOptions
from faust.web import Request
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from pipeline import metrics
from pipeline.api_keys import KeyRing, follow_keys, server_secret
from pipeline.errors import InsecureConfiguration, RequestError
from pipeline.follow import keep_following
from pipeline.ids import valid_id

if TYPE_CHECKING:
    from pipeline.app import DocflowApp
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

UNAUTHENTICATED = "unauthenticated"  # the company label of metrics when no key proved the company


@dataclass(frozen=True)
class Caller:
    company_id: str
    key_id: str | None  # None when auth is off

    @property
    def metric_company(self) -> str:
        """A company id proven by a key, never one a request merely names (metric labels stay bounded)."""
        return self.company_id if self.key_id else UNAUTHENTICATED

    @property
    def acting_as(self) -> str:
        """Who a rate limit counts and a lifecycle state names: the key, or the company without keys."""
        return f"key:{self.key_id}" if self.key_id else f"company:{self.company_id}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve other hosts without keys, or with keys no other web worker could verify."""
    if is_loopback(settings.web_host):
        return
    if settings.auth != "required":
        raise InsecureConfiguration(
            f"the web role would listen on {settings.web_host} without authentication: "
            "set DOCFLOW_AUTH=required (and create keys with `docflow keys create`), or listen on 127.0.0.1"
        )
    if not settings.auth_secret:
        raise InsecureConfiguration(
            f"the web role listens on {settings.web_host} but DOCFLOW_AUTH_SECRET is not set: every web worker "
            "and `docflow keys` must hash keys with the same secret"
        )


class Gate:
    """Authentication and rate limits of one web worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.required = settings.auth == "required"
        self.ring = KeyRing(server_secret(settings)) if self.required else None
        self.keys_loaded = asyncio.Event()
        if not self.required:
            self.keys_loaded.set()
        self._limits = {
            "upload": RateLimitItemPerMinute(settings.rate_limit_uploads_per_minute),
            "search": RateLimitItemPerMinute(settings.rate_limit_searches_per_minute),
        }
        self._limiter: MovingWindowRateLimiter | None = None

    def caller(self, request: Request, body_company: object = None, token: str | None = None) -> Caller:
        """The authenticated caller of a request; 401, 403 or 400 when there is none."""
        named = [
            value
            for value in (request.headers.get("X-Company-ID"), request.query.get("company_id"), body_company)
            if value is not None and value != ""
        ]
        if not self.required:
            if not named and self.settings.default_company_id:
                return Caller(self.settings.default_company_id, None)  # a single-tenant demo (seed 001)
            if not named:
                raise RequestError(400, "missing_company_id", "the X-Company-ID header is required")
            company_id = _valid_company(named[0])
            self._same_company(company_id, named)
            return Caller(company_id, None)
        presented = _presented_key(request) or token
        if not presented:
            metrics.auth_failures_total.labels("missing").inc()
            raise RequestError(401, "missing_credentials", "send an API key: Authorization: Bearer KEY or X-API-Key")
        if not self.keys_loaded.is_set():
            raise RequestError(503, "auth_unavailable", "API keys are still loading; try again in a moment")
        record = self.ring.authenticate(presented)
        if record is None:
            metrics.auth_failures_total.labels("invalid").inc()
            raise RequestError(401, "invalid_credentials", "the API key is unknown or revoked")
        self._same_company(record.company_id, named)
        return Caller(record.company_id, record.key_id)

    def _same_company(self, company_id: str, named: list) -> None:
        if any(value != company_id for value in named):
            metrics.auth_failures_total.labels("company_mismatch").inc()
            raise RequestError(403, "company_mismatch", "the request names another company than its credentials")

    async def admit(self, caller: Caller, action: str) -> None:
        """Count one ``action`` of the caller; 429 with Retry-After past the per-minute limit."""
        item = self._limits[action]
        if item.amount == 0:
            return
        if self._limiter is None:  # its storage needs the running loop
            self._limiter = MovingWindowRateLimiter(MemoryStorage())
        if await self._limiter.hit(item, action, caller.acting_as):
            return
        reset_at, _ = await self._limiter.get_window_stats(item, action, caller.acting_as)
        metrics.rate_limited_requests_total.labels(action).inc()
        raise RateLimited(max(1, math.ceil(reset_at - time.time())), action, item.amount)

    async def follow(self) -> None:
        """Keep the key ring current for as long as the worker runs, waiting out broker outages."""
        await keep_following("auth.keys", lambda: follow_keys(self.settings, self.ring, self.keys_loaded))


class RateLimited(RequestError):
    def __init__(self, retry_after: int, action: str, per_minute: int) -> None:
        super().__init__(429, "rate_limited", f"more than {per_minute} {action} requests a minute; retry later")
        self.retry_after = retry_after


def _presented_key(request: Request) -> str | None:
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("X-API-Key") or None


def _valid_company(value: object) -> str:
    if not isinstance(value, str) or not valid_id(value):
        raise RequestError(
            400,
            "invalid_company_id",
            "company id must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value


def cors_options(settings: Settings) -> dict[str, ResourceOptions]:
    """Faust's web_cors_options: the allowed origins only, with the headers the API reads."""
    return {
        origin: ResourceOptions(
            allow_credentials=False,
            allow_headers=("Authorization", "X-API-Key", "X-Company-ID", "Content-Type"),
            expose_headers=("Retry-After",),
            allow_methods=("GET", "POST", "DELETE"),
            max_age=600,
        )
        for origin in settings.cors_origin_list
    }


def register(app: DocflowApp) -> Gate:
    """The web worker's gate; keys are followed from auth.keys while the worker runs."""
    check_exposure(app.settings)
    gate = Gate(app.settings)
    if gate.required:

        @app.task
        async def follow_api_keys() -> None:
            await gate.follow()

    else:

        @app.task
        async def warn_unauthenticated() -> None:
            log.warning(
                "AUTHENTICATION IS OFF: anyone who can reach %s:%s acts as any company it names. "
                "Set DOCFLOW_AUTH=required before serving anyone but this machine.",
                app.settings.web_host,
                app.settings.web_port,
            )

    return gate
