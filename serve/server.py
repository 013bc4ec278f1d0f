"""Bind the address first (a taken port fails before the model loads), then run the app
under uvicorn: in this thread (`run`, the CLI) or a background one (`start`, tests)."""

from __future__ import annotations

import errno
import socket
import threading
import time

import uvicorn

from edgellama.runtime.model import Model

from . import ServeError
from .app import create_app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on host {host!r} ({exc.strerror}); give an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # over TIME_WAIT only, never over a listener
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use; stop what holds it or choose another --port") from None
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --host or --port") from None
    return sock


class Server:
    def __init__(self, model: Model, sock: socket.socket, max_concurrent: int = 4, model_id: str | None = None,
                 log_level: str = "info", cache_bytes: int | None = None, speculation: dict | None = None,
                 api_key: str | None = None):
        """model_id: the name served (None: the bundle's stem or the folder's name); api_key:
        if set, every route but /health needs `Authorization: Bearer <api_key>`."""
        self.sock = sock
        self.app = create_app(model, model_id, max_concurrent, cache_bytes, speculation, api_key=api_key)
        self.model_id = self.app.state.model_id
        config = uvicorn.Config(self.app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=3)
        self._uvicorn = _Uvicorn(config, on_exit=self.engine.close)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def engine(self):
        return self.app.state.engine

    def run(self) -> None:
        """Serve until Ctrl-C (SIGINT) or SIGTERM."""
        self._uvicorn.run(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> "Server":
        """Serve from a background thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self.run, name="edgellama-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.engine.close()
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()


class _Uvicorn(uvicorn.Server):
    """On Ctrl-C / SIGTERM, end the generations first: open streams then finish with an
    error event and [DONE] instead of being cut off when the graceful shutdown times out."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        # A signal handler runs on the event loop's thread, which may hold the engine's lock.
        threading.Thread(target=self._on_exit, name="edgellama-shutdown").start()
        super().handle_exit(sig, frame)
