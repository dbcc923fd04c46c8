"""``neuroscan serve``: the service, its HTTP server, and its end.

Loopback by default; any other address is refused unless ``NEUROSCAN_TOKEN`` is set, and
then every request must carry it. The socket is bound before the model loads, so a port in
use is one line at once; the URL is printed once the pipelines are loaded.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from cluster.service import Service
from neuroscan.config import ScanConfig, ServeConfig
from neuroscan.errors import UserError


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({err.strerror or err}): choose another --port or --host"
        ) from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def background(service: Service, host: str, port: int, token: str | None = None) -> tuple[str, Callable[[], None]]:
    """The HTTP API of a started ``service`` on a thread of this process (the benchmark and the
    tests use it): its URL, and a function that stops it."""
    import uvicorn

    from cluster.api import make_app

    sock = bind(host, port)
    config = uvicorn.Config(make_app(service, token), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="neuroscan-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the HTTP server stopped while starting")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return url_of(sock), stop


def serve(cfg: ServeConfig, template: ScanConfig) -> int:
    import uvicorn

    from cluster.api import make_app

    token = os.environ.get("NEUROSCAN_TOKEN") or None
    if not is_loopback(cfg.host) and token is None:
        raise UserError(
            f"--host {cfg.host} is reachable from other machines: set NEUROSCAN_TOKEN (clients send it too), "
            "or serve on 127.0.0.1"
        )
    sock = bind(cfg.host, cfg.port)
    service = Service(cfg, template)
    try:
        service.start()
        print(
            f"serving on {url_of(sock)} ({template.stages} stages x {template.replicas} replicas loaded in "
            f"{service.loaded_s:.0f} s; scans under {service.results})",
            flush=True,
        )
        config = uvicorn.Config(make_app(service, token), log_level="warning", access_log=False, lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        print("stopping: running scans are queued again and resume when the service starts", file=sys.stderr)
        service.close()
        sock.close()
    return 0
