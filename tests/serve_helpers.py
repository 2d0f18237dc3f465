"""A `retrodb serve` app in a thread of the test process (loopback, a free port)."""

from __future__ import annotations

import threading
from typing import Any

import uvicorn

from retrodb.serve.app import make_app
from retrodb.serve.service import Service
from retrodb_cli.serve import when_listening


class Running:
    """A uvicorn server in a thread of this process, on a free loopback port."""

    def __init__(self, service: Service, **app_options: Any) -> None:
        self.service = service
        config = uvicorn.Config(
            make_app(service, **app_options), host="127.0.0.1", port=0, log_level="error"
        )
        self.server = uvicorn.Server(config)
        started = threading.Event()
        ports: list[int] = []
        when_listening(self.server, lambda port: (ports.append(port), started.set()))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert started.wait(60), "the server did not start"
        self.url = f"http://127.0.0.1:{ports[0]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.service.close()
