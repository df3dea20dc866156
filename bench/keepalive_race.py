"""Why a server's keep-alive timeout must outlast its clients': the transport errors of a race.

    python bench/keepalive_race.py [--requests 1000]

A client pool reuses an idle connection until its own expiry (httpx: 5 s); uvicorn closes an idle
connection after ``timeout_keep_alive`` (its default: also 5 s). When the two are equal, a request
sent just before the client's expiry can reach a socket the server is closing at that moment: the
connection drops with no response ("Server disconnected without sending a response"), the one
transport error in 20,000 requests seen under load. This script runs a trivial app under uvicorn
and 10 clients that reuse connections just before the pool expiry, once with the server's timeout
equal to the client's and once longer, and counts transport errors. Times are scaled down (0.3 s)
so it takes seconds; the race is the same at 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


def transport_errors(server_keep_alive: float, client_expiry: float, requests: int) -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="error", timeout_keep_alive=server_keep_alive)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    async def clients() -> int:
        errors = 0
        limits = httpx.Limits(keepalive_expiry=client_expiry)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as http:

            async def one_client(seed: int) -> None:
                nonlocal errors
                rng = random.Random(seed)
                for _ in range(requests // 10):
                    try:
                        await http.get("/ping")
                    except httpx.TransportError:
                        errors += 1
                    # idle until just before the pool would drop the connection
                    await asyncio.sleep(client_expiry * rng.uniform(0.985, 1.0))

            await asyncio.gather(*(one_client(k) for k in range(10)))
        return errors

    try:
        return asyncio.run(clients())
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    print("| server keep-alive (s) | client pool expiry (s) | transport errors |")
    print("|---|---|---|")
    for server_s, client_s in ((0.3, 0.3), (1.0, 0.3), (0.3, 0.3), (1.0, 0.3)):
        errors = transport_errors(server_s, client_s, args.requests)
        print(f"| {server_s} | {client_s} | {errors} / {args.requests} |", flush=True)


if __name__ == "__main__":
    main()
