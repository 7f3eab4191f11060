"""The same-node channel: a private Unix socket between a power-flow actor and the clients on its node.

Why: a Ray call costs ~1 ms (gRPC, thread hand-offs) while the solve of 8 scenarios on IEEE 33 takes
~0.2 ms, and a round trip on a Unix socket ~20 us.  Clients on the actor's node therefore send their
requests through the socket the actor serves from its own event loop (:class:`ChannelServer`), into the
same batchers as Ray calls; Ray still finds the actor, restarts it and carries the calls of clients on
other nodes.  The socket lives in a fresh private (0700) directory, so only this user's processes reach it.

Framing: each message is a :data:`FRAME` header (sequence number, body length) and a body.  A client
numbers its requests; the server answers each when its solve is done, in any order (two feeders of one
shard are solved by two batchers), with the request's number, and :class:`Channel` pairs them up.

Dead channels: an actor killed by Ray (SIGKILL: restarts, ``ray.kill``, the end of a job) runs no exit
hook and leaves its directory behind; every new server sweeps those (:func:`remove_dead_channels`).

Nothing here knows Ray or the solver: a server answers each body with ``handler(body)``, pickled as
``(True, answer)`` or ``(False, the exception)``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import pickle
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

FRAME = struct.Struct("!QQ")
"""A message's header: its sequence number, its body's length in bytes."""
CHANNEL_PREFIX = "evgrid-pf-"
"""Channel directories are ``<tmp>/evgrid-pf-*/solve.sock``."""
_SOCKET = "solve.sock"


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class ChannelLost(ConnectionError):
    """The socket broke (the actor died or restarts): worth a retry, as a Ray actor failure is."""


# ---------------------------------------------------------------------------------------------- server side


class ChannelServer:
    """Serves a Unix socket from the running event loop: each request body is answered with
    ``await handler(body)``, pickled as ``(True, answer)``, or ``(False, exception)`` if it raised."""

    def __init__(self, handler: Callable[[bytes], Awaitable[Any]], label: str = "power-flow") -> None:
        self.handler = handler
        self.label = label
        self.path: str | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._answers: set[asyncio.Task] = set()  # requests being answered (the loop keeps weak refs only)

    async def open(self) -> str:
        """Listen on a socket in a fresh private directory; returns its path."""
        remove_dead_channels()
        path = os.path.join(tempfile.mkdtemp(prefix=CHANNEL_PREFIX), _SOCKET)
        self._listener = await asyncio.start_unix_server(self._serve, path)
        atexit.register(remove_channel, path)
        self.path = path
        log.info("%s: same-node channel at %s", self.label, path)
        return path

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: frames in, each answered when its handler is done (in any order)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                seq, n = FRAME.unpack(await reader.readexactly(FRAME.size))
                body = await reader.readexactly(n)
                task = loop.create_task(self._answer(writer, seq, body))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, seq: int, body: bytes) -> None:
        try:
            out = (True, await self.handler(body))
        except Exception as e:  # the caller's error (a bad request), raised there as it is raised here
            out = (False, e)
        try:
            data = dumps(out)
        except Exception as e:  # an exception that does not pickle
            data = dumps((False, RuntimeError(f"{type(out[1]).__name__}: {out[1]}")))
            log.debug("%s answer %d: %s", self.label, seq, e)
        if not writer.is_closing():
            writer.write(FRAME.pack(seq, len(data)) + data)


def remove_channel(path: str) -> None:
    """Remove a channel's socket and its directory (if empty)."""
    for rm in (os.unlink, os.rmdir):
        with contextlib.suppress(OSError):
            rm(path)
        path = os.path.dirname(path)


def remove_dead_channels(min_age_s: float = 60.0) -> int:
    """Remove this user's channel directories whose actor is gone; returns how many.

    A socket nobody listens on refuses the connection.  Directories younger than ``min_age_s`` are left
    alone (their actor may be binding now), as are other users' and live ones.
    """
    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(CHANNEL_PREFIX)]
    except OSError:
        return 0
    now = time.time()
    removed = 0
    for name in names:
        d = os.path.join(root, name)
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if st.st_uid != os.getuid() or now - st.st_mtime < min_age_s:
            continue
        path = os.path.join(d, _SOCKET)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(path)  # a live actor's channel: keep it
        except (ConnectionRefusedError, FileNotFoundError):
            remove_channel(path)
            removed += not os.path.exists(d)
        except OSError:
            continue
    return removed


# ---------------------------------------------------------------------------------------------- client side


class Channel:
    """A blocking connection to a :class:`ChannelServer`.

    Requests carry a sequence number; an answer that arrives before its :meth:`receive` waits here.  A
    broken socket raises :class:`ChannelLost` (and closes the channel); a timeout raises ``TimeoutError``.
    """

    def __init__(self, path: str, timeout_s: float | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self._seq = 0
        self._early: dict[int, bytearray] = {}
        with self._lost():
            self.sock.connect(path)

    @contextlib.contextmanager
    def _lost(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError:
            raise
        except OSError as e:
            self.sock.close()
            raise ChannelLost(f"{type(e).__name__}: {e}") from e

    def send(self, body: bytes) -> int:
        """Send a request; returns its sequence number for :meth:`receive`."""
        self._seq += 1
        with self._lost():
            self.sock.sendall(FRAME.pack(self._seq, len(body)) + body)
        return self._seq

    def receive(self, seq: int) -> bytearray:
        """The answer's body to request ``seq`` (answers to others that come first are kept)."""
        with self._lost():
            while seq not in self._early:
                got, n = FRAME.unpack(self._read(FRAME.size))
                self._early[got] = self._read(n)
        return self._early.pop(seq)

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        k = 0
        while k < n:
            m = self.sock.recv_into(view[k:])
            if m == 0:
                raise ConnectionResetError("the power-flow actor closed the channel")
            k += m
        return buf

    def close(self) -> None:
        self.sock.close()


__all__ = ["CHANNEL_PREFIX", "FRAME", "Channel", "ChannelLost", "ChannelServer", "dumps", "remove_channel",
           "remove_dead_channels"]
