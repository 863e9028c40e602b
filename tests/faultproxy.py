"""A fault-injecting HTTP proxy between the agent and the store, run as its own process.

    python tests/faultproxy.py --port 9001 --upstream http://127.0.0.1:8640

It forwards every request to the upstream store. Faults are scripted per request to the
batches endpoint: POST a JSON list of actions to /_faults, and each batch request takes the
next action (then "pass" once the list is used up):

    "pass"                    forward, answer with the store's answer
    "status:503"              answer 503 without forwarding (any status)
    "retry-after:429:2"       answer 429 with Retry-After: 2 (seconds), without forwarding
    "retry-after-date:503:2"  the same with an HTTP date 2 seconds ahead
    "reset-before"            drop the connection without forwarding
    "reset-after"             forward (the store applies), then drop the connection: a lost ack
    "cut-after"               forward, then send half the answer's body and drop the connection
    "delay:5"                 wait 5 seconds, then forward (for the agent's read timeout)

GET /_faults/log lists what each batch request met. It listens on loopback only and stops
by itself after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import time

import aiohttp
from aiohttp import web

_HOP = {"host", "content-length", "transfer-encoding", "connection"}


class Faults:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.script: list[str] = []
        self.log: list[dict[str, object]] = []
        self.session: aiohttp.ClientSession | None = None

    async def set_script(self, request: web.Request) -> web.Response:
        self.script = list(await request.json())
        return web.json_response({"queued": len(self.script)})

    async def get_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        is_batch = request.method == "POST" and request.path.endswith("/batches")
        action = self.script.pop(0) if is_batch and self.script else "pass"
        if is_batch:
            self.log.append({"path": request.path, "action": action, "at": time.time()})
        kind, _, arg = action.partition(":")
        body = await request.read()

        if kind == "status":
            return web.json_response({"error": f"injected {arg}"}, status=int(arg))
        if kind in ("retry-after", "retry-after-date"):
            code, _, seconds = arg.partition(":")
            value = seconds
            if kind == "retry-after-date":
                value = email.utils.formatdate(time.time() + float(seconds), usegmt=True)
            return web.json_response(
                {"error": "injected"}, status=int(code), headers={"Retry-After": value}
            )
        if kind == "reset-before":
            return self._drop(request)
        if kind == "delay":
            await asyncio.sleep(float(arg))

        status, headers, answer = await self._upstream(request, body)
        if kind == "reset-after":
            return self._drop(request)
        if kind == "cut-after":
            response = web.StreamResponse(status=status)
            response.content_length = len(answer)
            await response.prepare(request)
            await response.write(answer[: len(answer) // 2])
            return self._drop(request)
        return web.Response(status=status, body=answer, headers=headers)

    async def _upstream(
        self, request: web.Request, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = self.upstream + request.path_qs
        async with self.session.request(request.method, url, data=body, headers=headers) as up:
            answer = await up.read()
            kept = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            return up.status, kept, answer

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError


async def main(port: int, upstream: str, lifetime_s: float) -> None:
    faults = Faults(upstream)
    faults.session = aiohttp.ClientSession()
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/_faults", faults.set_script)
    app.router.add_get("/_faults/log", faults.get_log)
    app.router.add_route("*", "/{tail:.*}", faults.forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"faultproxy listening on 127.0.0.1:{port}", flush=True)
    try:
        await asyncio.sleep(lifetime_s)
    finally:
        await faults.session.close()
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--lifetime", type=float, default=600.0)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.upstream, args.lifetime))
