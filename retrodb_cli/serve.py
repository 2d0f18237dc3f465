"""`retrodb serve`: one database over HTTP for many processes (docs/serve.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import Command, DeviceOpt, ThreadsOpt, err_console, fail, handle_errors

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def serve(
    dbs: Annotated[
        list[Path],
        typer.Argument(help="The database directory (several: shards, with --engine ray)."),
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; loopback unless you say otherwise.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).")] = 8321,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Require 'Authorization: Bearer TOKEN' on every endpoint but /healthz "
            "(default: $RETRODB_TOKEN when set).",
        ),
    ] = None,
    batching: Annotated[
        bool | None,
        typer.Option(
            "--batching/--no-batching",
            help="Gather concurrent requests' texts into shared encoder runs (default: on "
            "when the encoder runs on a GPU, off on a CPU, where it costs throughput).",
            show_default=False,
        ),
    ] = None,
    batch_wait_ms: Annotated[
        float,
        typer.Option("--batch-wait-ms", help="How long a batch waits for more texts, ms."),
    ] = 1.0,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Most texts in one encoder run.")
    ] = 256,
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", help="Largest request body (413 above), MB.")
    ] = 64.0,
    load_indexes: Annotated[
        bool,
        typer.Option(
            "--load-indexes", help="Read the HNSW indexes into memory instead of mapping them."
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="local: one database in this process; ray: shards on Ray Serve (docs/serve.md).",
        ),
    ] = "local",
    replicas: Annotated[
        int, typer.Option("--replicas", help="Ray Serve replicas per shard (--engine ray).", min=1)
    ] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="A running Ray cluster to deploy on (--engine ray)."),
    ] = None,
    port_file: Annotated[
        Path | None,
        typer.Option("--port-file", help="Write the bound port here once listening."),
    ] = None,
) -> None:
    """Serve a database over HTTP: /search, /retrieve, /query, /info (docs/serve.md).

    The server follows commits (a `retrodb add` elsewhere is answered within a second),
    gathers concurrent queries into shared encoder runs, and tells every answer's
    generation. Point clients at it with `retrodb query http://HOST:PORT ...` or
    retrodb.connect(url)."""
    import uvicorn

    from retrodb.serve.app import make_app
    from retrodb.serve.service import Service

    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and len(dbs) != 1:
        fail("several databases are shards: serve them with --engine ray (docs/serve.md)")
    if max_batch < 1 or batch_wait_ms < 0 or max_body_mb <= 0:
        fail("--max-batch must be >= 1, --batch-wait-ms >= 0 and --max-body-mb > 0")
    token = token or os.environ.get("RETRODB_TOKEN") or None
    if host not in LOOPBACK and token is None:
        err_console.print(
            f"warning: serving on {host} without --token: anyone who can reach it can query",
            highlight=False,
        )
    if engine == "ray":
        _serve_shards(dbs, host, port, replicas, threads, device, token, max_body_mb, ray_address)
        return
    service = Service(
        dbs[0],
        threads=threads,
        device=device,
        batching=batching,
        max_batch=max_batch,
        wait_s=batch_wait_ms / 1000,
        load_indexes=load_indexes,
    )
    app = make_app(service, token=token, max_body=int(max_body_mb * 2**20))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if port_file is not None:
        when_listening(server, lambda bound: _write_port(port_file, bound))
    err_console.print(
        f"serving {service.path} (generation {service.snapshot().generation}) on "
        f"http://{host}:{port if port else '<any>'}",
        highlight=False,
    )
    try:
        server.run()
    finally:
        service.close()


def _serve_shards(
    dbs: list[Path],
    host: str,
    port: int,
    replicas: int,
    threads: int | None,
    device: str,
    token: str | None,
    max_body_mb: float,
    address: str | None,
) -> None:
    """Deploy the shards and the ingress on Ray Serve and wait until interrupted."""
    import threading

    try:
        from retrodb.serve import shards
    except ImportError as exc:  # pragma: no cover - without the ray extra
        fail(f"--engine ray needs Ray Serve: pip install 'retrodb[ray]' ({exc})")
    url = shards.deploy(
        dbs,
        host=host,
        port=port,
        replicas=replicas,
        threads=threads,
        device=device,
        token=token,
        max_body=int(max_body_mb * 2**20),
        address=address,
    )
    err_console.print(
        f"serving {len(dbs)} shards on {url} (Ray Serve); Ctrl-C stops", highlight=False
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        shards.shutdown()


def when_listening(server: Any, callback: Callable[[int], None]) -> None:
    """Call ``callback(port)`` once the uvicorn ``server`` listens (the port it bound,
    which ``--port 0`` leaves to the system): the handshake of --port-file and the tests."""
    startup = server.startup

    async def started(sockets: Any = None) -> None:
        await startup(sockets)
        callback(server.servers[0].sockets[0].getsockname()[1])

    server.startup = started


def _write_port(port_file: Path, port: int) -> None:
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(port_file)
    err_console.print(f"listening on port {port}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="serve", cls=Command)(handle_errors(serve))
