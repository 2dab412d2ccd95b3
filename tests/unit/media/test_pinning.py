"""The fetcher dials the address it checked: DNS is asked once per hop, a rebinding answer on a later
hop is checked like the first, TLS keeps the URL's host name for SNI and the certificate check."""

from __future__ import annotations

import asyncio
import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qwen_gateway.errors import MediaDownloadFailed, MediaURLRefused
from qwen_gateway.media.fetch import Downloader
from qwen_gateway.media.urls import parse_target
from qwen_gateway.settings import MediaSettings
from tests.fakes import ScriptedDNS
from tests.media_support import CountingListener, png_bytes


@dataclass
class TLSServer:
    port: int
    ca: Path
    sni: list[str | None]
    hosts: list[str | None]


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TLSServer]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=media.test",
         "-addext", "subjectAltName=DNS:media.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    seen_sni: list[str | None] = []
    seen_hosts: list[str | None] = []
    body = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen_hosts.append(self.headers["Host"])
            if self.path == "/again":  # a redirect back to the same host name: a second DNS lookup
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, name, _ctx: seen_sni.append(name)  # type: ignore[assignment,misc,return-value]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield TLSServer(port=httpd.server_address[1], ca=cert, sni=seen_sni, hosts=seen_hosts)
    httpd.shutdown()
    httpd.server_close()


def downloader(ca: Path | None = None, allow: tuple[str, ...] = ("127.0.0.1",)) -> Downloader:
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    return Downloader(MediaSettings(allow_hosts=allow, fetch_timeout=60), ssl_context=context)


def test_https_dials_the_checked_address_with_the_url_host_for_sni(
    tls_server: TLSServer, listener_factory: type[CountingListener]
) -> None:
    # What a second lookup would answer: 127.0.0.2, where a listener on the same port counts arrivals.
    rebound = listener_factory("127.0.0.2", tls_server.port)

    async def main() -> tuple[bytes, ScriptedDNS]:
        dns = ScriptedDNS(asyncio.get_running_loop(), {"media.test": [["127.0.0.1"], ["127.0.0.2"]]})
        body = await downloader(tls_server.ca).get(
            f"https://media.test:{tls_server.port}/img.png", max_bytes=10**6
        )
        return body, dns

    body, dns = asyncio.run(main())
    assert body == png_bytes()
    assert dns.lookups == {"media.test": 1}
    assert tls_server.sni == ["media.test"]
    assert tls_server.hosts == [f"media.test:{tls_server.port}"]
    assert rebound.connections() == 0


def test_rebinding_on_a_later_hop_is_checked_again(
    tls_server: TLSServer, listener_factory: type[CountingListener]
) -> None:
    rebound = listener_factory("127.0.0.2", tls_server.port)

    async def main() -> None:
        ScriptedDNS(asyncio.get_running_loop(), {"media.test": [["127.0.0.1"], ["127.0.0.2"]]})
        await downloader(tls_server.ca).get(f"https://media.test:{tls_server.port}/again", max_bytes=10**6)

    with pytest.raises(MediaURLRefused):
        asyncio.run(main())
    assert tls_server.hosts == [f"media.test:{tls_server.port}"]  # the first hop only
    assert rebound.connections() == 0


def test_certificate_is_checked_against_the_url_host(tls_server: TLSServer) -> None:
    async def main() -> None:
        ScriptedDNS(asyncio.get_running_loop(), {"other.test": [["127.0.0.1"]]})
        await downloader(tls_server.ca).get(f"https://other.test:{tls_server.port}/img.png", max_bytes=10**6)

    with pytest.raises(MediaDownloadFailed):
        asyncio.run(main())
    assert tls_server.hosts == []  # the handshake failed: no request was sent


@pytest.mark.parametrize(
    ("answers", "allow", "refused"),
    [
        (["192.168.1.5"], ("127.0.0.1",), True),
        (["8.8.8.8", "10.0.0.5"], ("127.0.0.1",), True),  # one private answer refuses the name
        (["8.8.8.8", "::1"], (), True),
        (["::ffff:169.254.169.254"], (), True),
        (["192.168.1.5"], ("named.test",), False),  # opened by name
        (["10.0.0.5", "10.1.0.5"], ("10.0.0.0/8",), False),  # opened by CIDR
        (["8.8.8.8", "2001:4860:4860::8888"], (), False),
    ],
)
def test_every_resolved_address_is_checked(answers: list[str], allow: tuple[str, ...], refused: bool) -> None:
    async def main() -> str:
        ScriptedDNS(asyncio.get_running_loop(), {"named.test": [answers]})
        return str(await downloader(allow=allow).resolve(parse_target("http://named.test/x.png")))

    if refused:
        with pytest.raises(MediaURLRefused):
            asyncio.run(main())
    else:
        assert asyncio.run(main()) == answers[0]
