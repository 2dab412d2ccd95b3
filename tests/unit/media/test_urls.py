"""Which URLs the media fetcher opens: every spelling of a forbidden target is refused before any
connection; public addresses resolve to the address that will be dialled; the allow list opens
exactly what it names."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from qwen_gateway.errors import MediaURLRefused, StartupError
from qwen_gateway.media.fetch import Downloader
from qwen_gateway.media.urls import AllowList, is_public, parse_ipv4_whatwg, parse_target
from qwen_gateway.settings import MediaSettings, Settings


def resolve(url: str, allow: tuple[str, ...] = ()) -> str:
    downloader = Downloader(MediaSettings(allow_hosts=allow))
    return str(asyncio.run(downloader.resolve(parse_target(url))))


REFUSED = [
    # loopback in every IPv4 spelling resolvers accept
    "http://127.0.0.1/",
    "http://127.0.0.1./",
    "http://127.1/",
    "http://127.0.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://0x7F.0x0.0x0.0x1/",
    "http://0177.0.0.1/",
    "http://0177.1/",
    "http://017700000001/",
    "http://127.000.000.001/",
    "https://127.0.0.1:8443/x.png",
    # loopback and friends in IPv6, plain and with an embedded IPv4 address
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[0:0:0:0:0:ffff:127.0.0.1]/",
    "http://[::127.0.0.1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:10.0.0.1]/",
    # unspecified
    "http://0.0.0.0/",
    "http://0/",
    "http://[::]/",
    # private, link-local, CGNAT, cloud metadata
    "http://10.0.0.1/",
    "http://10.255.255.255/",
    "http://172.16.0.1/",
    "http://172.31.255.254/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://0xa9fea9fe/",  # 169.254.169.254 in hex
    "http://2852039166/",  # 169.254.169.254 in decimal
    "http://100.100.100.200/latest/meta-data/",
    "http://100.64.0.1/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd00:ec2::254]/",
    # multicast, broadcast, reserved, documentation, benchmarking, tunnels
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://192.0.2.1/",
    "http://198.18.0.1/",
    "http://[ff02::1]/",
    "http://[2001:db8::1]/",
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[2001::1]/",  # Teredo
    # names that resolve to loopback
    "http://localhost/",
    "http://LOCALHOST./",
    "http://localhost:8080/x.png",
    # userinfo tricks (refused whole: no parser gets to disagree about the host)
    "http://allowed@127.0.0.1/",
    "http://user:pass@example.com/",
    "http://example.com@127.0.0.1/",
    "http://127.0.0.1\\@example.com/",
    # other schemes
    "file:///etc/passwd",
    "ftp://example.com/x.png",
    "gopher://127.0.0.1:6379/_INFO",
    "dict://127.0.0.1:11211/stat",
    "oss://bucket/x.png",
    "javascript:alert(1)",
    "//example.com/x.png",
    "example.com/x.png",
    # malformed hosts: refused, never guessed
    "http:///x.png",
    "http://%31%32%37.0.0.1/",
    "http://[::1%25lo]/",
    "http://1.2.3.4.5/",
    "http://256.0.0.1/",
    "http://0x100000000/",
    "http://08.0.0.1/",
    "http://1.2.3.0x/",
    "http://example.123/",
    "http://a..b/",
    "http://-bad-.example/",
    "http://１２７.０.０.１/",  # fullwidth digits
    "http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/",  # enclosed letters (IDN mapping to "localhost")
]


@pytest.mark.parametrize("url", REFUSED)
def test_forbidden_spellings_are_refused(url: str) -> None:
    with pytest.raises(MediaURLRefused) as err:
        resolve(url)
    assert err.value.status == 400
    assert err.value.code == "invalid_parameter_error"
    assert err.value.message == "<400> InternalError.Algo.InvalidParameter: The provided URL is not allowed."


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://8.8.8.8/a.png", "8.8.8.8"),
        ("https://1.1.1.1/a.png", "1.1.1.1"),
        ("http://134744072/", "8.8.8.8"),  # decimal spelling of a public address is that address
        ("http://0x8.0x8.0x8.0x8/", "8.8.8.8"),
        ("http://[2606:4700:4700::1111]/", "2606:4700:4700::1111"),
        ("http://[::ffff:8.8.8.8]/", "8.8.8.8"),  # dialled as the IPv4 address it carries
    ],
)
def test_public_addresses_resolve_to_what_is_dialled(url: str, address: str) -> None:
    assert resolve(url) == address


def test_allow_list_opens_exactly_its_entries() -> None:
    allow = ("127.0.0.1", "10.0.0.0/8", "images.internal")
    assert resolve("http://127.0.0.1:9/", allow) == "127.0.0.1"
    assert resolve("http://2130706433:9/", allow) == "127.0.0.1"  # the same address, spelled otherwise
    assert resolve("http://[::ffff:10.1.2.3]/", allow) == "10.1.2.3"
    assert resolve("http://10.200.0.7/", allow) == "10.200.0.7"
    for url in ("http://127.0.0.2/", "http://192.168.0.1/", "http://169.254.169.254/"):
        with pytest.raises(MediaURLRefused):
            resolve(url, allow)

    names = AllowList(allow)
    private = ipaddress.ip_address("192.168.7.7")
    assert names.permits(parse_target("http://images.internal/x.png"), private)
    assert names.permits(parse_target("http://IMAGES.internal./x.png"), private)
    assert not names.permits(parse_target("http://evil.images.internal/x.png"), private)
    assert not names.permits(parse_target("http://images.internal.evil.com/x.png"), private)


def test_allow_hosts_setting_is_checked_at_startup() -> None:
    assert Settings.load(overrides={"media": {"allow_hosts": ["::1", "fd00::/8", "Bücher.example"]}})
    with pytest.raises(StartupError, match=r"media\.allow_hosts"):
        Settings.load(overrides={"media": {"allow_hosts": ["not a host!"]}})


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("1.2.3.4.", "1.2.3.4"),
        ("0", "0.0.0.0"),
        ("example.com", None),
        ("1.2.3.example", None),
    ],
)
def test_whatwg_ipv4_parsing(host: str, expected: str | None) -> None:
    parsed = parse_ipv4_whatwg(host)
    assert (str(parsed) if parsed is not None else None) == expected


def test_hosts_are_normalized_once() -> None:
    # IDN to its ASCII form, case and the trailing dot dropped, numeric hosts to their dotted quad.
    assert parse_target("http://Bücher.Example./a.png").host == "xn--bcher-kva.example"
    assert parse_target("HTTPS://0x7F.1:8443/a.png").url == "https://127.0.0.1:8443/a.png"
    assert parse_target("http://[::FFFF:7F00:1]/").host == "::ffff:7f00:1"
    assert parse_target("http://example.com/a%20b.png?x=1").url.raw_path == b"/a%20b.png?x=1"


def test_classification_unwraps_embedded_ipv4() -> None:
    assert not is_public(ipaddress.ip_address("::ffff:192.168.0.1"))
    assert not is_public(ipaddress.ip_address("64:ff9b::a9fe:a9fe"))
    assert is_public(ipaddress.ip_address("::ffff:8.8.4.4"))
    assert is_public(ipaddress.ip_address("64:ff9b::808:808"))
