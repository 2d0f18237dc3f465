"""A `retrodb serve` app in a thread of the test process (loopback, a free port)."""

from __future__ import annotations

import threading
from typing import Any

import uvicorn

from retrodb.serve.app import make_app
from retrodb.serve.service import Service


class Running:
    """A uvicorn server in a thread of this process, on a free loopback port."""

    def __init__(self, service: Service, **app_options: Any) -> None:
        self.service = service
        config = uvicorn.Config(
            make_app(service, **app_options), host="127.0.0.1", port=0, log_level="error"
        )
        self.server = uvicorn.Server(config)
        started = threading.Event()
        startup = self.server.startup

        async def announce(sockets: Any = None) -> None:
            await startup(sockets)
            started.set()

        self.server.startup = announce  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert started.wait(60), "the server did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.service.close()
