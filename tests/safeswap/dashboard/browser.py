"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol.

Records every network request the page makes, console errors and failed loads,
counts the rendered charts and takes a screenshot. Anything that is not on
127.0.0.1 cannot load anyway: Chromium runs with a proxy on a closed loopback
port for everything but loopback, so an external request would fail and show up
both as a request and as a failed load.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from streams.broker import free_port, wait_for_port
from streams.process import stop_process

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "headless Chromium is needed for the dashboard browser test and was not found: "
        "`apt-get install -y chromium` (.ci/run installs it)"
    )


@dataclass
class PageVisit:
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    charts: dict = field(default_factory=dict)
    screenshot: bytes = b""


async def _visit(ws_url: str, url: str, settle, width: int, height: int) -> PageVisit:
    visit = PageVisit()
    ids = itertools.count(1)
    pending: dict[int, asyncio.Future] = {}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, max_msg_size=64 * 1024 * 1024) as ws:

            async def reader() -> None:
                async for msg in ws:
                    data = json.loads(msg.data)
                    if "id" in data and data["id"] in pending:
                        pending.pop(data["id"]).set_result(data)
                        continue
                    method, params = data.get("method"), data.get("params", {})
                    if method == "Network.requestWillBeSent":
                        visit.requests.append(params["request"]["url"])
                    elif method == "Network.loadingFailed":
                        visit.failed.append(f"{params.get('errorText')} ({params.get('requestId')})")
                    elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                        visit.console_errors.append(json.dumps(params.get("args"))[:300])
                    elif method == "Runtime.exceptionThrown":
                        visit.console_errors.append(json.dumps(params.get("exceptionDetails"))[:300])
                    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                        visit.console_errors.append(params["entry"].get("text", "")[:300])

            task = asyncio.create_task(reader())

            async def call(method: str, **params):
                ident = next(ids)
                future = asyncio.get_running_loop().create_future()
                pending[ident] = future
                await ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
                reply = await asyncio.wait_for(future, 30)
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

            try:
                for domain in ("Network.enable", "Runtime.enable", "Log.enable", "Page.enable"):
                    await call(domain)
                await call(
                    "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
                )
                await call("Page.navigate", url=url)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    state = await call("Runtime.evaluate", expression="document.readyState", returnByValue=True)
                    if state["result"].get("value") == "complete":
                        break
                    await asyncio.sleep(0.1)
                if settle is not None:
                    await settle(call)
                count = await call(
                    "Runtime.evaluate",
                    returnByValue=True,
                    expression="""(() => {
                    const svgs = Array.from(document.querySelectorAll('svg.chart'));
                    return {svg: svgs.length,
                            nonempty: svgs.filter(s => s.querySelectorAll('path').length > 0).length,
                            bands: document.querySelectorAll('svg.chart path.band').length,
                            thresholds: document.querySelectorAll('svg.chart line.threshold').length,
                            canvas: document.querySelectorAll('canvas').length,
                            urls: Array.from(document.querySelectorAll('[src],[href]'))
                                       .map(e => e.getAttribute('src') || e.getAttribute('href')),
                            version: document.body.getAttribute('data-version'),
                            // chart labels drawn (partly) outside their chart: cut off on screen
                            clipped: Array.from(document.querySelectorAll('svg.chart text')).filter(t => {
                                const box = t.getBBox(), view = t.ownerSVGElement.viewBox.baseVal;
                                return box.width > 0 && (box.x < -0.5 || box.y < -0.5 ||
                                    box.x + box.width > view.width + 0.5 || box.y + box.height > view.height + 0.5);
                            }).map(t => t.textContent),
                            ranges: Array.from(document.querySelectorAll('svg.chart[data-range]'))
                                         .map(s => s.getAttribute('data-range')),
                            current_stage: document.querySelectorAll('svg.chart rect.current-stage').length,
                            health_rows: Array.from(document.querySelectorAll('table.checks tbody tr'))
                                              .map(r => Array.from(r.cells).map(c => c.innerText)),
                            dead_letter_rows: Array.from(document.querySelectorAll('table.dead-letters tbody tr'))
                                                   .map(r => Array.from(r.cells).map(c => c.innerText)),
                            decision_times: Array.from(document.querySelectorAll('table.decisions tbody tr'))
                                                 .map(r => r.cells[1].innerText),
                            text: document.body.innerText.slice(0, 20000)};
                })()""",
                )
                visit.charts = count["result"]["value"]
                shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                visit.screenshot = base64.b64decode(shot["data"])
            finally:
                task.cancel()
    return visit


def visit_page(url: str, settle=None, width: int = 1400, height: int = 2000, timeout_s: float = 60.0) -> PageVisit:
    """Open ``url`` in a fresh headless Chromium, return what it requested and rendered."""
    binary = chromium_binary()
    port = free_port()
    closed = free_port()  # nothing listens here: the proxy every non-loopback request is sent to
    with tempfile.TemporaryDirectory(prefix="safeswap-chromium-") as profile:
        process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--mute-audio",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}",
                "--remote-debugging-address=127.0.0.1",
                f"--proxy-server=127.0.0.1:{closed}",
                "--proxy-bypass-list=127.0.0.1;localhost",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            if not wait_for_port("127.0.0.1", port, 30):
                raise RuntimeError(f"chromium did not open its DevTools port within 30 s ({binary})")
            ws_url = asyncio.run(_page_target(port))
            return asyncio.run(asyncio.wait_for(_visit(ws_url, url, settle, width, height), timeout_s))
        finally:
            stop_process(process, timeout_s=5)


async def _page_target(port: int) -> str:
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    targets = await response.json(content_type=None)
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("chromium has no page target")


def save(data: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
