"""Which URLs the media fetcher may open: parsing once, classifying addresses, the operator's allow list.

Pure functions, no I/O (name resolution happens in ``fetch.py``), so every spelling of a forbidden
target is tested as a table. The rules:

- only ``http`` and ``https``; no userinfo (``http://allowed@127.0.0.1/`` is refused whole, so no two
  parsers can disagree about which part is the host);
- the host is read the way resolvers read it: a name whose last label is a number is an IPv4 address
  in WHATWG/``inet_aton`` spelling (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``) and is
  normalized to its dotted-quad; anything that does not parse cleanly is refused rather than guessed;
- an address is *public* only if it is in none of the special-purpose ranges below; an IPv6 address that
  embeds an IPv4 one (mapped, compatible, NAT64) is judged by the IPv4 address it carries;
- the operator's ``allow_hosts`` (IPs, CIDRs, host names; all ports) open exactly those targets.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from qwen_gateway.errors import MediaURLRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Special-purpose ranges (IANA IPv4/IPv6 special-purpose registries) that a fetch for a client must
# never reach unless the operator opened them: loopback, private, CGNAT (100.100.100.200, Alibaba
# Cloud's metadata service, is in 100.64/10), link-local (169.254.169.254, the usual metadata service),
# documentation, benchmarking, multicast, reserved, broadcast, ULA, site-local, the translation and
# tunnelling prefixes (6to4, Teredo: they carry an IPv4 address we could not check).
_BLOCKED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "2002::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Target:
    """A URL parsed once: what the fetcher connects to and what it says in ``Host``/SNI."""

    url: httpx.URL  # with the normalized host (an IP literal is canonical, a name IDNA-encoded)
    scheme: str
    host: str  # a lower-case name without the trailing dot, or an IP in canonical text
    ip: IPAddress | None  # set when the URL names an address, not a name
    port: int


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped ``::ffff:a.b.c.d``, compatible ``::a.b.c.d``,
    NAT64 ``64:ff9b::a.b.c.d``), else None."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def normalize_ip(ip: IPAddress) -> IPAddress:
    """The address a connection to ``ip`` really reaches, for classification and allow-list matching."""
    v4 = embedded_ipv4(ip)
    return v4 if v4 is not None else ip


def is_public(ip: IPAddress) -> bool:
    """True if ``ip`` (after unwrapping an embedded IPv4 address) is in no special-purpose range."""
    ip = normalize_ip(ip)
    return not any(ip.version == net.version and ip in net for net in _BLOCKED)


def parse_ipv4_whatwg(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read as an IPv4 address the way URL parsers and ``inet_aton`` read it.

    Returns None if the last label is not a number (an ordinary name). Raises ``ValueError`` for a
    numeric-looking host that is not a valid address (``1.2.3.4.5``, ``256.1``, ``0x``)."""
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()
    if not parts or not _is_number(parts[-1]):
        return None
    if len(parts) > 4:
        raise ValueError("too many parts")
    numbers = [_parse_number(p) for p in parts]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ValueError("part out of range")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _is_number(part: str) -> bool:
    p = part.lower()
    if p.startswith("0x"):
        return all(c in "0123456789abcdef" for c in p[2:])
    return p.isascii() and p.isdigit()


def _parse_number(part: str) -> int:
    p = part.lower()
    if not p:
        raise ValueError("empty part")
    if p.startswith("0x"):
        # A bare "0x" is 0 to WHATWG but garbage to inet_aton: parsers disagree, so it is refused.
        return int(p[2:], 16)
    if len(p) > 1 and p.startswith("0"):
        return int(p, 8)  # raises for 8/9: refused, as browsers refuse them
    return int(p, 10)


def parse_target(raw: str) -> Target:
    """Parse ``raw`` once into the :class:`Target` the fetcher will use; refuse what it must not open."""
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise MediaURLRefused() from None
    scheme = url.scheme.lower()
    if scheme not in _DEFAULT_PORTS or url.userinfo:
        raise MediaURLRefused()
    raw_host = url.raw_host.decode("ascii", "replace").lower()
    if not raw_host or "%" in raw_host:  # percent-encoded hosts and IPv6 zone ids
        raise MediaURLRefused()
    port = url.port if url.port is not None else _DEFAULT_PORTS[scheme]
    ip: IPAddress | None
    if ":" in raw_host:  # httpx strips the brackets of an IPv6 literal
        try:
            ip = ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise MediaURLRefused() from None
        host = str(ip)
    else:
        name = raw_host[:-1] if raw_host.endswith(".") else raw_host
        try:
            ip = parse_ipv4_whatwg(name)
        except ValueError:
            raise MediaURLRefused() from None
        if ip is None:
            labels = name.split(".")
            if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
                raise MediaURLRefused()
            host = name
        else:
            host = str(ip)
    try:
        url = url.copy_with(host=host, scheme=scheme)
    except (httpx.InvalidURL, ValueError):
        raise MediaURLRefused() from None
    return Target(url=url, scheme=scheme, host=host, ip=ip, port=port)


class AllowList:
    """The operator's ``[media] allow_hosts``: IPs, CIDRs and host names that may be fetched even though
    they are not public. Names match the URL's host exactly (case and a trailing dot aside); IPs and
    CIDRs match every address the host resolves to. Ports are not restricted."""

    def __init__(self, entries: Iterable[str]) -> None:
        nets: list[IPNetwork] = []
        names: set[str] = set()
        for entry in entries:
            value = entry.strip().lower()
            try:
                nets.append(ipaddress.ip_network(value.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = value[:-1] if value.endswith(".") else value
            try:
                name = httpx.URL(f"http://{name}/").raw_host.decode("ascii")
            except (httpx.InvalidURL, UnicodeDecodeError):
                name = ""
            if not name or not all(_LABEL.match(label) for label in name.split(".")):
                raise ValueError(f"not an IP, CIDR or host name: {entry!r}")
            names.add(name)
        self._nets = tuple(nets)
        self._names = frozenset(names)

    def allows_name(self, host: str) -> bool:
        return host in self._names

    def allows_ip(self, ip: IPAddress) -> bool:
        candidates = {ip, normalize_ip(ip)}
        return any(c.version == n.version and c in n for c in candidates for n in self._nets)

    def permits(self, target: Target, ip: IPAddress) -> bool:
        """May the fetcher connect to ``ip`` (one address ``target``'s host resolved to)?"""
        return self.allows_name(target.host) or self.allows_ip(ip) or is_public(ip)
