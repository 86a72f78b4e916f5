"""Listening: the address bound before the model loads, and uvicorn's server with a drain.

`bind(host, port)` resolves and binds the address (without listening yet), so a bad --host or a
busy --port is an error before any weight is read. `run(served, sock)` serves the app on it;
the first SIGTERM or Ctrl-C drains (`app.drain`: new requests 503, running ones finish within
`drain_timeout_s`, the rest end with finish_reason "abort"), then the process exits normally;
a second signal ends every request at once.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import signal
import socket

import uvicorn

from dynaexq_jax.errors import UserError
from dynaexq_jax.serve.app import Served, drain, make_app

# After the drain, how long uvicorn waits for responses to go out: a client that stopped reading
# holds its connection open, and is cut after this.
SEND_GRACE_S = 5


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (the first address `host` resolves to), not yet listening."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"the host {host!r} does not resolve ({getattr(e, 'strerror', e)}); listen on an address "
                        "of this machine, e.g. --host 127.0.0.1 (or 0.0.0.0: every interface)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse the port at once
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        where = f"{host}:{port}"
        why = {errno.EADDRINUSE: f"port {port} is in use on {host} (another server?); stop it or pass another --port",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; pass one of its own, e.g. --host "
                                    "127.0.0.1",
               errno.EACCES: f"port {port} needs privileges here; pass a port above 1023"}.get(e.errno)
        raise UserError(why or f"cannot listen on {where} ({e.strerror}); pass another --host or --port") from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """Whether only this machine can reach `sock`'s address."""
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


class Server(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM or Ctrl-C drains before it stops (uvicorn alone stops
    listening at once and re-raises the signal, so the process ends by it, not with status 0)."""

    def __init__(self, config: uvicorn.Config, served: Served, drain_timeout_s: float):
        super().__init__(config)
        self.served, self.drain_timeout_s = served, drain_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:  # a signal handler: only hand the work to the loop
        if self.loop is None or self.draining is not None:  # a second signal, or one before serving: stop now
            self.served.scheduler.abort("abort")
            self.should_exit = True
            self.force_exit = self.force_exit or (self.draining is not None and sig == signal.SIGINT)
            return
        self.draining = True  # until the task exists (the loop runs it next)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def run():
            await drain(self.served, self.drain_timeout_s)
            self.should_exit = True  # uvicorn then stops listening and waits for the streams to end

        self.draining = asyncio.ensure_future(run())


def run(served: Served, sock: socket.socket, *, drain_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Serve `served` on `sock` (from `bind`) until a signal has drained it."""
    config = uvicorn.Config(make_app(served), log_level=log_level, timeout_graceful_shutdown=SEND_GRACE_S)
    Server(config, served, drain_timeout_s).run(sockets=[sock])
