"""Downloading media for a client without letting the client aim the server at its own network.

Each hop of a download: the URL is parsed once (``urls.parse_target``), its host resolved once, every
resolved address checked against the special-purpose ranges and the operator's allow list, and the
connection made to the address that was checked: a per-hop connection pool whose network backend
ignores the host it is asked for and dials the pinned address (so a second DNS answer can't redirect
it), while the URL keeps the host name for ``Host`` and TLS SNI/certificate checks. Redirects are
followed here, hop by hop, each one checked the same way; the body is streamed and dropped past the
byte cap; the whole download runs under one deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import math
import socket
import ssl
from collections.abc import Iterable

import httpcore
import httpx

from qwen_gateway.errors import (
    MediaDownloadFailed,
    MediaDownloadTimeout,
    MediaFormatInvalid,
    MediaTooLarge,
    MediaURLRefused,
)
from qwen_gateway.media.urls import AllowList, IPAddress, Target, parse_target
from qwen_gateway.settings import MediaSettings

log = logging.getLogger(__name__)

_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
_NETWORK_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ConnectionNotAvailable,
    ssl.SSLError,
    OSError,
)


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Dials one checked address whatever host the pool asks for (and refuses any other host name)."""

    def __init__(self, host: str, address: str) -> None:
        self._host = host
        self._address = address
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if host != self._host:  # only the hop we checked; never reached through our own requests
            raise httpcore.ConnectError("unexpected host")
        return await self._inner.connect_tcp(self._address, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class Downloader:
    """Fetches ``http(s)`` URLs under the ``[media]`` caps; one per app (it holds the TLS context)."""

    def __init__(self, settings: MediaSettings, *, ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: the CAs to trust for https (default: the certifi bundle, loaded at the
        first https download)."""
        self._settings = settings
        self._allow = AllowList(settings.allow_hosts)
        self._ssl = ssl_context

    async def get(self, url: str, *, max_bytes: int) -> bytes:
        """The body at ``url`` (following redirects), at most ``max_bytes`` long."""
        try:
            async with asyncio.timeout(self._settings.fetch_timeout):
                return await self._follow(parse_target(url), max_bytes)
        except TimeoutError:
            raise MediaDownloadTimeout() from None

    async def _follow(self, target: Target, max_bytes: int) -> bytes:
        for _ in range(self._settings.max_redirects + 1):
            address = await self.resolve(target)
            location, body = await self._request(target, address, max_bytes)
            if location is None:
                return body
            try:
                next_url = target.url.join(location)
            except (httpx.InvalidURL, ValueError):
                raise MediaDownloadFailed() from None
            target = parse_target(str(next_url))
        raise MediaDownloadFailed()  # too many redirects

    async def resolve(self, target: Target) -> IPAddress:
        """The one address to dial for ``target``; refuses if *any* address its host has is forbidden
        (a name with one public and one private answer must not get a second try at the private one)."""
        if target.ip is not None:
            addresses: list[IPAddress] = [target.ip]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(
                    target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
            except (OSError, UnicodeError):
                raise MediaDownloadFailed() from None
            addresses = []
            for info in infos:
                try:
                    ip = ipaddress.ip_address(str(info[4][0]))
                except ValueError:
                    raise MediaDownloadFailed() from None
                if ip not in addresses:
                    addresses.append(ip)
        if not addresses:
            raise MediaDownloadFailed()
        refused = [ip for ip in addresses if not self._allow.permits(target, ip)]
        if refused:
            # The address stays in the server log only; the client gets the fixed message.
            log.info("media: refused %s (resolves to non-public %s)", target.host, refused[0])
            raise MediaURLRefused()
        first = addresses[0]
        # An IPv4-mapped address is dialled as the IPv4 address it is (the one that was checked).
        if isinstance(first, ipaddress.IPv6Address) and first.ipv4_mapped is not None:
            return first.ipv4_mapped
        return first

    async def _request(self, target: Target, address: IPAddress, max_bytes: int) -> tuple[str | None, bytes]:
        """One GET to ``address``: ``(location, b"")`` for a redirect, else ``(None, body)``."""
        url = httpcore.URL(
            scheme=target.scheme.encode(),
            host=target.host.encode(),
            port=target.port,
            target=target.url.raw_path,
        )
        default_port = 443 if target.scheme == "https" else 80
        host_header = f"[{target.host}]" if ":" in target.host else target.host
        if target.port != default_port:
            host_header += f":{target.port}"
        headers = [
            (b"Host", host_header.encode()),
            (b"Accept", b"image/*,video/*;q=0.9,*/*;q=0.1"),
            # Compressed bodies would make the byte cap meaningless (and a gzip bomb possible).
            (b"Accept-Encoding", b"identity"),
            (b"User-Agent", b"qwen-gateway-media"),
        ]
        budget = self._settings.fetch_timeout
        extensions = {"timeout": {"connect": budget, "read": budget, "write": budget, "pool": budget}}
        if target.scheme == "https" and self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        pool = httpcore.AsyncConnectionPool(
            ssl_context=self._ssl,
            network_backend=_PinnedBackend(target.host, str(address)),
            max_connections=1,
            max_keepalive_connections=0,
        )
        try:
            async with pool, pool.stream("GET", url, headers=headers, extensions=extensions) as response:
                return await self._read(response, max_bytes)
        except httpcore.TimeoutException:
            raise MediaDownloadTimeout() from None
        except _NETWORK_ERRORS:
            raise MediaDownloadFailed() from None

    async def _read(self, response: httpcore.Response, max_bytes: int) -> tuple[str | None, bytes]:
        fields = {k.lower(): v for k, v in response.headers}
        if response.status in _REDIRECTS:
            location = fields.get(b"location")
            if not location:
                raise MediaDownloadFailed()
            return location.decode("latin-1"), b""
        if not 200 <= response.status < 300:
            raise MediaDownloadFailed()
        if fields.get(b"content-encoding", b"identity").strip().lower() != b"identity":
            raise MediaDownloadFailed()
        declared = fields.get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
            raise MediaTooLarge(max_bytes, data_uri=False)
        body = bytearray()
        async for chunk in response.aiter_stream():
            body += chunk
            if len(body) > max_bytes:
                raise MediaTooLarge(max_bytes, data_uri=False)
        return None, bytes(body)


def decode_data_url(url: str, *, max_bytes: int, kind: str) -> bytes:
    """The bytes of a base64 ``data:`` URL; the size is capped before anything is decoded."""
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise MediaFormatInvalid(kind)
    encoded_cap = 4 * math.ceil(max_bytes / 3)
    # Cheap refusal first (line breaks in the payload would at most double it), then the exact one.
    if len(payload) > 2 * encoded_cap + 16:
        raise MediaTooLarge(max_bytes, data_uri=True)
    compact = "".join(payload.split())
    if len(compact) > encoded_cap:
        raise MediaTooLarge(max_bytes, data_uri=True)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise MediaFormatInvalid(kind) from None
    if len(data) > max_bytes:
        raise MediaTooLarge(max_bytes, data_uri=True)
    return data
