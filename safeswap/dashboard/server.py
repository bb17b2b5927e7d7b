"""The dashboard's web server (aiohttp): the page, its JSON API and its two static files.

Routes (all GET):

=============================  ================================================================
``/``  (``?rollout=ID``)        the page: rollout list, and the chosen (default: first) rollout
``/fragment?rollout=ID``        ``{version, nav, main}``: the page's two parts, for the live refresh
``/api/version``                ``{version, source, live, error, undecodable, restarts}``
``/api/rollouts``               the rollout list
``/api/rollouts/<id>``          everything the page shows for one rollout (JSON)
``/static/dashboard.css|js``    the only style sheet and script (no CDN, no inline script)
=============================  ================================================================

Access: binds ``dashboard_host`` (127.0.0.1) unless told otherwise. With a
``dashboard_token`` every request needs ``Authorization: Bearer <token>``, or the
cookie a first visit with ``?token=<token>`` sets (HttpOnly, SameSite=Strict).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from safeswap.dashboard.model import DashboardModel
from safeswap.dashboard.page import CSS, JS, guarded, nav_html, page_html, rollout_html
from streams.settings import Settings

log = logging.getLogger(__name__)
COOKIE = "safeswap_dashboard"
ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
    b'fill="#1f2328"/><path d="M3 11 L7 6 L10 9 L13 4" stroke="#e45756" stroke-width="2" fill="none"/></svg>'
)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class DashboardState:
    model: DashboardModel
    live: bool
    token: str = ""
    live_source: Any = None  # LiveSource while live (its error shows on the page)
    extra: dict[str, Any] = field(default_factory=dict)

    def error(self) -> str | None:
        return getattr(self.live_source, "error", None) if self.live_source is not None else None


def _selected(state: DashboardState, request: web.Request) -> str | None:
    wanted = request.query.get("rollout")
    if wanted and wanted in state.model.tracks:
        return wanted
    rollouts = state.model.rollouts()
    return rollouts[0]["rollout_id"] if rollouts else None


def _parts(state: DashboardState, selected: str | None) -> tuple[str, str]:
    # Each part on its own: one rollout whose events break the view costs its own
    # part of the page (a placeholder saying why), never an HTTP 500 for the page.
    model = state.model
    nav = guarded("rollout list", lambda: nav_html(model.rollouts(), selected))
    main = guarded(f"rollout {selected}", lambda: rollout_html(model.view(selected) if selected else None))
    return nav, main


def build_app(state: DashboardState) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        if state.token:
            supplied = ""
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                supplied = header[len("Bearer ") :].strip()
            elif "token" in request.query:
                supplied = request.query["token"]
            else:
                supplied = request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(supplied.encode(), state.token.encode()):
                response = web.Response(
                    status=401,
                    text="safeswap dashboard: a bearer token is required\n",
                    headers={"WWW-Authenticate": 'Bearer realm="safeswap"'},
                )
                response.headers.update(SECURITY_HEADERS)
                return response
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        if state.token and "token" in request.query:
            response.set_cookie(COOKIE, state.token, httponly=True, samesite="Strict", path="/")
        return response

    async def page(request: web.Request) -> web.Response:
        selected = _selected(state, request)
        nav, main = _parts(state, selected)
        html = page_html(
            nav, main, selected=selected, source=state.model.source, live=state.live, version=state.model.version
        )
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def fragment(request: web.Request) -> web.Response:
        selected = _selected(state, request)
        version = state.model.version
        nav, main = _parts(state, selected)
        return web.json_response({"version": version, "nav": nav, "main": main})

    async def version(request: web.Request) -> web.Response:
        source = state.live_source
        return web.json_response(
            {
                "version": state.model.version,
                "source": state.model.source,
                "live": state.live,
                "error": state.error(),
                # Records skipped as unshowable, and read-loop reconnects (live only).
                "undecodable": getattr(source, "undecodable", 0),
                "restarts": getattr(source, "restarts", 0),
            }
        )

    async def rollouts(request: web.Request) -> web.Response:
        return web.json_response({"rollouts": state.model.rollouts(), "version": state.model.version})

    async def rollout(request: web.Request) -> web.Response:
        view = state.model.view(request.match_info["rollout_id"])
        if view is None:
            return web.json_response({"error": "no such rollout"}, status=404)
        return web.Response(text=json.dumps(view, allow_nan=False, default=str), content_type="application/json")

    async def css(request: web.Request) -> web.Response:
        return web.Response(text=CSS, content_type="text/css", charset="utf-8")

    async def js(request: web.Request) -> web.Response:
        return web.Response(text=JS, content_type="application/javascript", charset="utf-8")

    async def icon(request: web.Request) -> web.Response:
        return web.Response(body=ICON, content_type="image/svg+xml")

    app = web.Application(middlewares=[guard])
    app.router.add_get("/favicon.ico", icon)
    app.router.add_get("/", page)
    app.router.add_get("/fragment", fragment)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/rollouts", rollouts)
    app.router.add_get("/api/rollouts/{rollout_id:.+}", rollout)
    app.router.add_get("/static/dashboard.css", css)
    app.router.add_get("/static/dashboard.js", js)
    return app


class Dashboard:
    """A running dashboard: ``await start()`` / ``await stop()``, or ``run_in_thread()`` for tests."""

    def __init__(
        self, settings: Settings, data_dir: str | None = None, host: str | None = None, port: int | None = None
    ) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.host = host or settings.dashboard_host
        self.port = settings.dashboard_port if port is None else port
        self.state: DashboardState | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> Dashboard:
        if self.data_dir is not None:
            from safeswap.dashboard.sources import load_recorded

            model = await asyncio.get_running_loop().run_in_executor(None, load_recorded, self.data_dir)
            self.state = DashboardState(model, live=False, token=self.settings.dashboard_token)
        else:
            from safeswap.dashboard.sources import LiveSource

            source = await LiveSource(self.settings).start()
            self.state = DashboardState(
                source.model, live=True, token=self.settings.dashboard_token, live_source=source
            )
        self._runner = web.AppRunner(build_app(self.state), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if not self.port:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.state is not None and self.state.live_source is not None:
            await self.state.live_source.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- for tests and embedding: the server on its own loop in a thread --------------
    def run_in_thread(self, timeout_s: float = 120.0) -> Dashboard:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # noqa: BLE001
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name="safeswap-dashboard", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"dashboard did not start within {timeout_s} s")
        if failure:
            raise failure[0]
        return self

    def stop_thread(self, timeout_s: float = 20.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)


async def serve_forever(dashboard: Dashboard) -> None:
    await dashboard.start()
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await dashboard.stop()
