"""Upstreams as the gateway sees them: the routing table, connections and health.

Each gateway process loads the routing table (public names and aliases →
upstream + served name) from the database every few seconds, keeps keep-alive
connections per upstream (proxy.gateway.upstream_http for requests, an aiohttp session for
health checks), and checks every upstream's /health in the background. A connection failure marks an upstream down at once;
the next successful health check brings it back.
"""
import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from django.conf import settings

from proxy.gateway.db import run_db
from proxy.gateway.upstream_http import UpstreamHTTP
from proxy.models import ModelAlias, ModelRoute

log = logging.getLogger("qwenhub.gateway")


@dataclass(eq=False, slots=True)
class UpstreamState:
    id: int
    name: str
    base_url: str
    api_key: str
    max_concurrency: int
    healthy: bool = True
    in_flight: int = 0
    session: aiohttp.ClientSession | None = None  # health checks
    http: UpstreamHTTP | None = None  # requests

    @property
    def root_url(self) -> str:
        """The server root (where /health lives): the base URL without its /v1."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def get_session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            self.session = aiohttp.ClientSession(
                connector=connector, headers=headers, auto_decompress=False, skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=settings.QWENHUB_UPSTREAM_CONNECT_TIMEOUT,
                    sock_read=settings.QWENHUB_UPSTREAM_TIMEOUT,
                ),
            )
        return self.session

    def get_http(self) -> UpstreamHTTP:
        if self.http is None:
            self.http = UpstreamHTTP(self.base_url, self.api_key or None,
                                     connect_timeout=settings.QWENHUB_UPSTREAM_CONNECT_TIMEOUT,
                                     read_timeout=settings.QWENHUB_UPSTREAM_TIMEOUT)
        return self.http

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.http is not None:
            await self.http.close()


@dataclass(frozen=True, slots=True)
class Route:
    model_id: int
    public_name: str
    default_max_tokens: int
    max_model_len: int
    targets: tuple[tuple[UpstreamState, str], ...]  # (upstream, served name)
    created: int = field(default=0)


class Router:
    """The routing table of one gateway process."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.models: list[Route] = []
        self.upstreams: dict[int, UpstreamState] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self._health_task: asyncio.Task | None = None

    def _load(self) -> list[tuple]:
        rows = list(
            ModelRoute.objects.filter(upstream__enabled=True)
            .select_related("model", "upstream")
            .order_by("model_id", "upstream_id")
        )
        aliases = list(ModelAlias.objects.values_list("alias", "model_id"))
        return [rows, aliases]

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._loaded_at < settings.QWENHUB_ROUTES_CACHE_SECONDS:
            return
        async with self._lock:
            if not force and time.monotonic() - self._loaded_at < settings.QWENHUB_ROUTES_CACHE_SECONDS:
                return
            rows, aliases = await run_db(self._load)
            upstreams: dict[int, UpstreamState] = {}
            by_model: dict[int, list] = {}
            for r in rows:
                u = r.upstream
                state = self.upstreams.get(u.pk)
                if state is None or (state.base_url, state.api_key) != (u.base_url, u.api_key):
                    if state is not None:
                        await state.close()
                    state = UpstreamState(id=u.pk, name=u.name, base_url=u.base_url, api_key=u.api_key,
                                          max_concurrency=u.max_concurrency)
                state.name, state.max_concurrency = u.name, u.max_concurrency
                upstreams[u.pk] = state
                by_model.setdefault(r.model_id, [r.model, []])[1].append((state, r.served_name))
            for gone in set(self.upstreams) - set(upstreams):
                await self.upstreams[gone].close()
            routes: dict[str, Route] = {}
            models = []
            for model, targets in by_model.values():
                route = Route(model_id=model.pk, public_name=model.name, default_max_tokens=model.default_max_tokens,
                              max_model_len=model.max_model_len, targets=tuple(targets),
                              created=int(model.created_at.timestamp()))
                routes[model.name] = route
                models.append(route)
            for alias, model_id in aliases:
                target = next((m for m in models if m.model_id == model_id), None)
                if target is not None:
                    routes.setdefault(alias, target)
            self.routes, self.models, self.upstreams = routes, models, upstreams
            self._loaded_at = time.monotonic()

    async def resolve(self, name: str) -> Route | None:
        await self.refresh()
        return self.routes.get(name)

    @staticmethod
    def candidates(route: Route) -> list[tuple[UpstreamState, str]]:
        """Healthy upstreams first, fewest in-flight requests first; the down ones last, as a last resort."""
        return sorted(route.targets, key=lambda t: (not t[0].healthy, t[0].in_flight))

    # --- health ------------------------------------------------------------------
    async def check_health(self) -> None:
        await self.refresh()
        await asyncio.gather(*(self._check(u) for u in list(self.upstreams.values())))

    async def _check(self, upstream: UpstreamState) -> None:
        try:
            async with upstream.get_session().get(
                upstream.root_url + "/health", timeout=aiohttp.ClientTimeout(total=2.0)
            ) as resp:
                healthy = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            healthy = False
        if healthy != upstream.healthy:
            log.warning("upstream %s is %s", upstream.name, "up" if healthy else "down")
        upstream.healthy = healthy

    def mark_down(self, upstream: UpstreamState) -> None:
        if upstream.healthy:
            log.warning("upstream %s is down (connection failed)", upstream.name)
        upstream.healthy = False

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:  # keep checking whatever happens (database down, …)
                log.exception("upstream health check failed")
            await asyncio.sleep(settings.QWENHUB_HEALTH_INTERVAL)

    def start(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        for upstream in self.upstreams.values():
            await upstream.close()
