"""Fetching a document from a URL, behind a guard against server-side request forgery.

A URL a user hands docflow must never make a docflow worker talk to something only the
worker can reach: its own loopback, the private network, link-local neighbours, the cloud
metadata service. So the guard judges addresses, not names: every hop's host is resolved
once, each address it resolves to is judged (:func:`refusal`), and the connection goes to
one of exactly those addresses, never to a second resolution (a name that answers
differently the second time, DNS rebinding, gains nothing).

How the connection is pinned: aiohttp is given a resolver (:class:`_PinnedResolver`) that
knows only the addresses already judged for the hop, so aiohttp never resolves anything
itself, while the request still carries the URL's own host name. TLS therefore works as
for any request: SNI and the certificate check use the host name (not the address), and
the Host header is the name. Connecting to the bare address with a hand-set Host header
and ``server_hostname`` would do the same with more code of docflow's own to get wrong.

Redirects are followed here, not by aiohttp, so that every Location is judged from scratch
(scheme, host, resolution, addresses) before anything is sent to it. The whole fetch,
resolution and redirects included, has one time limit; the body is streamed with a size
cap that counts decoded bytes (aiohttp decodes gzip, deflate and whatever else it
advertises in Accept-Encoding). No cookies are kept, no proxy from the environment is used
(a proxy would resolve names itself), and the URL may not carry credentials.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pipeline import __version__
from pipeline.errors import UrlFetchError, UrlRefused
from pipeline.settings import Settings

__all__ = [
    "USER_AGENT",
    "Address",
    "embedded_ipv4",
    "AllowList",
    "Fetched",
    "Resolver",
    "UrlFetchError",
    "UrlRefused",
    "fetch_url",
    "numeric_host",
    "refusal",
    "resolve",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Resolves (host, port) to addresses; fetch_url takes one so that tests never touch DNS.
Resolver = Callable[[str, int], Awaitable[Sequence[Address | str]]]

USER_AGENT = f"docflow/{__version__} (document ingestion)"
_SCHEMES = ("http", "https")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024

_v4 = ipaddress.IPv4Network
_v6 = ipaddress.IPv6Network

# Cloud metadata services: AWS, GCP, Azure, OpenStack... (169.254.169.254), AWS over IPv6,
# Alibaba Cloud. Judged before the ranges that contain them, for the clearer reason, and
# never admitted by an allow-listed *name*: only a network entry that contains them does.
_METADATA = frozenset(
    {
        ipaddress.IPv4Address("169.254.169.254"),
        ipaddress.IPv6Address("fd00:ec2::254"),
        ipaddress.IPv4Address("100.100.100.200"),
    }
)

# Ranges refused, most specific first (the first match gives the reason). Whatever else
# Python does not count as global is refused after these, as "not a public address".
_REFUSED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_v4("0.0.0.0/32"), "an unspecified address"),
    (_v4("0.0.0.0/8"), "a 'this network' address"),
    (_v4("127.0.0.0/8"), "a loopback address"),
    (_v4("10.0.0.0/8"), "a private address"),
    (_v4("172.16.0.0/12"), "a private address"),
    (_v4("192.168.0.0/16"), "a private address"),
    (_v4("100.64.0.0/10"), "a carrier-grade NAT address"),
    (_v4("169.254.0.0/16"), "a link-local address"),
    (_v4("192.0.0.0/24"), "an IETF protocol assignment"),
    (_v4("192.0.2.0/24"), "a documentation address"),
    (_v4("198.51.100.0/24"), "a documentation address"),
    (_v4("203.0.113.0/24"), "a documentation address"),
    (_v4("198.18.0.0/15"), "a benchmarking address"),
    (_v4("192.88.99.0/24"), "a 6to4 relay address"),
    (_v4("224.0.0.0/4"), "a multicast address"),
    (_v4("255.255.255.255/32"), "the broadcast address"),
    (_v4("240.0.0.0/4"), "a reserved address"),
)
_REFUSED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_v6("::/128"), "an unspecified address"),
    (_v6("::1/128"), "a loopback address"),
    (_v6("fc00::/7"), "a private (unique local) address"),
    (_v6("fec0::/10"), "a private (site-local) address"),
    (_v6("fe80::/10"), "a link-local address"),
    (_v6("ff00::/8"), "a multicast address"),
    (_v6("2001:db8::/32"), "a documentation address"),
    (_v6("3fff::/20"), "a documentation address"),
    (_v6("2001:2::/48"), "a benchmarking address"),
    (_v6("2001::/32"), "a Teredo tunnel address"),
    (_v6("100::/64"), "a discard-only address"),
    (_v6("64:ff9b:1::/48"), "a local-use NAT64 address"),
)
# IPv6 addresses that carry an IPv4 address which decides where a packet ends up.
_NAT64 = _v6("64:ff9b::/96")
_IPV4_TRANSLATED = _v6("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = _v6("::/96")

_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)\Z")
_HOST_NAME = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.?\Z")


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, compatible, translated, 6to4, NAT64)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: nor ::1, judged as themselves
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _host_key(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") and len(host) > 1 else host


@dataclass(frozen=True)
class AllowList:
    """Hosts (exact names, case-insensitive) and networks a URL may reach although not public.

    An allow-listed name admits whatever it resolves to, except a cloud metadata address:
    that needs a network entry containing it.
    """

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str | Iterable[str]) -> AllowList:
        """``"docs.internal, 10.1.0.0/16, 127.0.0.1, [::1]"``: names, addresses and CIDR networks."""
        entries = text.split(",") if isinstance(text, str) else list(text)
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = _host_key(raw)
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                if "/" in entry or ":" in entry:
                    raise ValueError(f"url_allow: {raw.strip()!r} is neither a host name nor a network") from None
            address = numeric_host(entry)  # 127.1 or 2130706433 mean an address here as in a URL
            if address is not None:
                networks.append(ipaddress.ip_network(address))
            elif _HOST_NAME.match(entry):
                hosts.add(entry)
            else:
                raise ValueError(f"url_allow: {raw.strip()!r} is neither a host name nor a network")
        return cls(frozenset(hosts), tuple(networks))

    def admits_host(self, host: str | None) -> bool:
        return host is not None and _host_key(host) in self.hosts

    def admits_address(self, address: Address) -> bool:
        candidates = [address]
        inner = embedded_ipv4(address)
        if inner is not None:
            candidates.append(inner)
        return any(candidate in network for candidate in candidates for network in self.networks)

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)


def _reason(address: Address) -> str | None:
    if address in _METADATA:
        return "a cloud metadata address"
    table = _REFUSED_V4 if isinstance(address, ipaddress.IPv4Address) else _REFUSED_V6
    for network, reason in table:
        if address in network:
            return reason
    if not address.is_global:
        return "not a public address"
    return None


def refusal(address: Address, allow: AllowList | None = None, *, host: str | None = None) -> str | None:
    """Why docflow refuses to connect to ``address`` (reached as ``host``), or None when it may.

    The message is the user-facing reason, e.g. ``"refused: 10.0.0.1 is a private address"``.
    An IPv6 address that carries an IPv4 one (``::ffff:10.0.0.1``, 6to4, NAT64) is judged as
    that IPv4 address too. ``allow`` admits an address in one of its networks, or any
    address of an allow-listed host name (but a metadata address only through a network).
    """
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return f"refused: {address} carries a zone index"
    allow = allow or AllowList()
    inner = embedded_ipv4(address)
    if inner is not None:  # where the packet really goes decides: ::ffff:10.0.0.1 is 10.0.0.1
        reason, shown = _reason(inner), f"{address} (IPv4 {inner})"
    else:
        reason, shown = _reason(address), str(address)
    if reason is None or allow.admits_address(address):
        return None
    if allow.admits_host(host) and address not in _METADATA and inner not in _METADATA:
        return None
    if host is not None and _is_name(host):
        return f"refused: {host} resolves to {shown}, {reason}"
    return f"refused: {shown} is {reason}"


def _is_name(host: str) -> bool:
    try:
        return numeric_host(host) is None
    except UrlRefused:
        return False


def numeric_host(host: str) -> Address | None:
    """The address a numeric host means, in every form ``inet_aton`` takes, or None for a name.

    ``127.0.0.1``, ``127.1``, ``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``[::1]``. A host
    whose last label is a number is an IPv4 address or nothing (as browsers treat it): one
    that does not parse raises :class:`UrlRefused` instead of going to DNS as a name.
    """
    key = host.strip().lower()
    if key.startswith("[") and key.endswith("]"):
        key = key[1:-1]
    if ":" in key:
        try:
            return ipaddress.IPv6Address(key)
        except ValueError:
            raise UrlRefused(f"refused: {host} is not a valid IPv6 address") from None
    parts = key.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not _NUMBER.match(parts[-1]):
        return None
    invalid = UrlRefused(f"refused: {host} is not a valid IPv4 address")
    if len(parts) > 4:
        raise invalid
    numbers = []
    for part in parts:
        if not _NUMBER.match(part):
            raise invalid
        try:
            if part[:2] == "0x":
                numbers.append(int(part[2:], 16))  # a bare 0x is no number, as inet_aton says
            elif len(part) > 1 and part[0] == "0":
                numbers.append(int(part, 8))
            else:
                numbers.append(int(part))
        except ValueError:  # 08, 09: not octal
            raise invalid from None
    *leading, last = numbers
    if any(number > 255 for number in leading) or last >= 256 ** (4 - len(leading)):
        raise invalid
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


async def _system_resolver(host: str, port: int) -> list[Address]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise UrlFetchError(f"could not resolve {host}: {exc.strerror}") from None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


async def resolve(host: str, port: int, *, resolver: Resolver | None = None) -> list[Address]:
    """The addresses ``host`` stands for: a numeric host as itself, a name through ``resolver``.

    ``resolver`` defaults to the event loop's getaddrinfo; its answers are deduplicated,
    in order. A name that resolves to nothing raises :class:`UrlFetchError`.
    """
    address = numeric_host(host)
    if address is not None:
        return [address]
    answers = await (resolver or _system_resolver)(host, port)
    addresses: list[Address] = []
    for answer in answers:
        parsed = answer if isinstance(answer, ipaddress.IPv4Address | ipaddress.IPv6Address) else None
        if parsed is None:
            try:
                parsed = ipaddress.ip_address(str(answer))
            except ValueError:
                raise UrlFetchError(f"could not resolve {host}: {answer!r} is not an address") from None
        if parsed not in addresses:
            addresses.append(parsed)
    if not addresses:
        raise UrlFetchError(f"could not resolve {host}: no addresses")
    return addresses


class _PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one fetch: answers only with addresses the guard already judged."""

    def __init__(self) -> None:
        self._pins: dict[str, list[Address]] = {}

    def pin(self, host: str, addresses: list[Address]) -> None:
        self._pins[host] = addresses

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        addresses = self._pins.get(host)
        if addresses is None:  # never: every hop pins its host before the request
            raise OSError(f"docflow fetch: {host} was not checked before connecting")
        results: list[ResolveResult] = []
        for address in addresses:
            address_family = socket.AF_INET if address.version == 4 else socket.AF_INET6
            if family not in (socket.AF_UNSPEC, address_family):
                continue
            results.append(
                {
                    "hostname": host,
                    "host": str(address),
                    "port": port,
                    "family": address_family,
                    "proto": socket.IPPROTO_TCP,
                    "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                }
            )
        if not results:
            raise OSError(f"docflow fetch: no checked address of {host} for this address family")
        return results

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class Fetched:
    """What a URL gave: the URL that answered, the server's Content-Type, the decoded body.

    ``content_type`` is the header as the server sent it (``""`` when absent); callers sniff
    the bytes rather than trust it. ``redirects`` lists the URLs that answered with a
    redirect, in order (the first is the URL asked for); empty when there was none.
    """

    final_url: str
    content_type: str
    data: bytes
    redirects: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Hop:
    url: URL
    host: str
    addresses: list[Address]


def _checked_url(url: URL | str) -> URL:
    """The URL if its form is acceptable (scheme, host, no credentials), numeric hosts made canonical."""
    try:
        url = URL(url) if isinstance(url, str) else url
    except (TypeError, ValueError) as exc:
        raise UrlRefused(f"refused: not a valid URL ({exc})") from None
    if url.scheme not in _SCHEMES:
        raise UrlRefused("only http and https URLs are fetched")
    if not url.raw_host:
        raise UrlRefused("refused: the URL has no host")
    if url.raw_user is not None or url.raw_password is not None:
        raise UrlRefused("refused: URLs carrying a user name or password are not fetched")
    host = url.raw_host
    address = numeric_host(host)
    if address is not None:
        if "%" in host:
            raise UrlRefused(f"refused: {host} carries a zone index")
        if host != str(address):  # 2130706433, 127.1, 0x7f.1: the request names the address itself
            url = url.with_host(str(address))
    elif not _HOST_NAME.match(host):
        raise UrlRefused(f"refused: {host} is not a valid host name")
    return url.with_fragment(None)


async def _judge(url: URL, allow: AllowList, resolver: Resolver | None) -> _Hop:
    host = url.raw_host
    assert host is not None and url.port is not None
    addresses = await resolve(host, url.port, resolver=resolver)
    for address in addresses:
        reason = refusal(address, allow, host=host)
        if reason is not None:
            raise UrlRefused(reason)
    return _Hop(url, host, addresses)


def _peer(response: aiohttp.ClientResponse) -> Address | None:
    connection = response.connection
    transport = connection.transport if connection is not None else None
    peer: Any = transport.get_extra_info("peername") if transport is not None else None
    if not peer:
        return None
    try:
        return ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None


async def _read_capped(response: aiohttp.ClientResponse, url: URL, limit: int) -> bytes:
    declared = response.content_length
    # Content-Length counts the encoded body; a compressed one is checked as it decodes.
    if declared is not None and declared > limit and not response.headers.get("Content-Encoding"):
        raise UrlFetchError(f"{url} is {declared} bytes, more than the {limit} bytes fetched from a URL")
    body = bytearray()
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise UrlFetchError(f"{url} is more than the {limit} bytes fetched from a URL")
    return bytes(body)


async def _fetch(
    url: URL, settings: Settings, allow: AllowList, resolver: Resolver | None, ssl_context: ssl.SSLContext | None
) -> Fetched:
    pins = _PinnedResolver()
    connector = aiohttp.TCPConnector(
        resolver=pins, use_dns_cache=False, force_close=True, ssl=ssl_context if ssl_context is not None else True
    )
    redirects: list[str] = []
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": USER_AGENT, "Accept": "*/*"},
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
        auto_decompress=True,
    ) as session:
        while True:
            hop = await _judge(url, allow, resolver)
            pins.pin(hop.host, hop.addresses)
            async with session.get(url, allow_redirects=False) as response:
                peer = _peer(response)
                if peer is not None and peer not in hop.addresses:  # defence in depth: cannot happen
                    raise UrlRefused(f"refused: connected to {peer}, which was not checked for {hop.host}")
                if response.status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise UrlFetchError(f"{url} answered HTTP {response.status} without a Location")
                    if len(redirects) >= settings.url_max_redirects:
                        raise UrlFetchError(
                            f"too many redirects: {url} redirects again after "
                            f"{settings.url_max_redirects} (the most followed)"
                        )
                    try:
                        target = url.join(URL(location))
                    except (TypeError, ValueError):
                        raise UrlFetchError(f"{url} redirects to an invalid URL: {location!r}") from None
                    redirects.append(str(url))
                    url = _checked_url(target)
                    continue
                if not 200 <= response.status < 300:
                    raise UrlFetchError(
                        f"{url} answered HTTP {response.status} {response.reason or ''}".rstrip(),
                        status=response.status,
                    )
                data = await _read_capped(response, url, settings.url_max_bytes)
                return Fetched(str(url), response.headers.get("Content-Type", ""), data, redirects)


async def fetch_url(
    url: str, settings: Settings, *, resolver: Resolver | None = None, ssl_context: ssl.SSLContext | None = None
) -> Fetched:
    """GET ``url`` behind the guard, following redirects (each judged again), within the limits.

    Raises :class:`UrlRefused` (the guard said no: scheme, host, address) or
    :class:`UrlFetchError` (resolution failed, non-2xx, too large, too slow, too many
    redirects, connection or TLS failure); both carry the user-facing reason.
    ``resolver(host, port)`` replaces getaddrinfo for host names (tests pass a stub);
    ``ssl_context`` replaces the default verifying context (a private CA), never to skip checks.
    """
    if ssl_context is not None and (not ssl_context.check_hostname or ssl_context.verify_mode != ssl.CERT_REQUIRED):
        raise ValueError("fetch_url: ssl_context must verify certificates and host names")
    allow = AllowList.parse(settings.url_allow)
    checked = _checked_url(url)
    try:
        async with asyncio.timeout(settings.url_timeout_seconds):
            return await _fetch(checked, settings, allow, resolver, ssl_context)
    except TimeoutError:
        raise UrlFetchError(
            f"{url} took longer than {settings.url_timeout_seconds:g} s (the most a URL's fetch may take)"
        ) from None
    except aiohttp.ClientSSLError as exc:
        raise UrlFetchError(f"{url}: TLS failed ({exc})") from None
    except aiohttp.ClientError as exc:
        raise UrlFetchError(f"could not fetch {url}: {exc or type(exc).__name__}") from None
