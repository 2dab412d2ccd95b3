"""Binding the listening address, first thing in ``serve``: a busy port is one line in about a second,
before the server stack is imported or any model is loaded (stdlib only, so it is cheap to import)."""

from __future__ import annotations

import errno
import socket
from typing import Any

from qwen_gateway.errors import StartupError


def bind(host: str, port: int, *, backlog: int = 2048) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (every address it resolves to), bound before any model loads
    so a busy port fails in a second, in one line, instead of after the checkpoint is in memory."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, type_, proto, _, resolved in infos:
            address: tuple[Any, ...] = tuple(resolved)
            if (family, address) in seen:
                continue
            seen.add((family, address))
            # With port 0 every address gets the port the first one was given.
            address = (address[0], port, *address[2:])
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                where = (
                    f"[{address[0]}]:{address[1]}"
                    if family == socket.AF_INET6
                    else f"{address[0]}:{address[1]}"
                )
                raise StartupError(f"cannot listen on {where}: {reason}") from None
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
