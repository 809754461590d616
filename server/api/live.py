"""Run an ASGI app under a real uvicorn server on a free loopback port, in a thread.

Used by the tests, the benchmarks and the simulator demo.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class LiveServer:
    """A real uvicorn server for an ASGI app on a free loopback port, run in a thread."""

    def __init__(self, app, host: str = "127.0.0.1") -> None:
        sock = socket.socket()
        sock.bind((host, 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
