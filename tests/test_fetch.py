"""The URL fetcher and its guard against server-side request forgery (pipeline/fetch.py).

Nothing here leaves 127.0.0.0/8: names resolve through a stub, public addresses are only
judged, never connected to, and a module-wide guard fails the test if any socket connect
(or a getaddrinfo of anything but a loopback literal) is attempted elsewhere.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import socket
import ssl
import time
from asyncio import selector_events

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pipeline.errors import ExtractionError, UrlFetchError, UrlRefused
from pipeline.fetch import USER_AGENT, AllowList, Fetched, fetch_url, numeric_host, refusal, resolve
from pipeline.settings import Settings

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
CAP = 4096


# --- the guard that keeps every test on loopback -------------------------------------------


class LeftLoopback(OSError):
    """A test tried to reach something outside 127.0.0.0/8."""


def _loopback_target(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    try:
        return ipaddress.ip_address(str(address[0]).split("%", 1)[0]) in LOOPBACK
    except ValueError:  # a name: connect() would resolve it
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connect and getaddrinfo of the test must stay in 127.0.0.0/8; records the connects."""
    violations: list[object] = []
    connects: list[tuple] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_sock_connect = selector_events.BaseSelectorEventLoop.sock_connect
    real_getaddrinfo = socket.getaddrinfo

    def check(address) -> None:
        if not _loopback_target(address):
            violations.append(address)
            raise LeftLoopback(f"test tried to connect to {address!r}")
        if isinstance(address, tuple):
            connects.append(address)

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    async def sock_connect(self, sock, address):
        check(address)
        return await real_sock_connect(self, sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _loopback_target((host if isinstance(host, str) else host.decode(),)):
            violations.append(host)
            raise LeftLoopback(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(selector_events.BaseSelectorEventLoop, "sock_connect", sock_connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield connects
    assert not violations, f"left loopback: {violations}"


def test_the_loopback_guard_judges_targets():
    # The guard's own decision, checked without ever attempting a connect elsewhere.
    assert _loopback_target(("127.0.0.1", 80)) and _loopback_target(("127.9.9.9", 80))
    assert not _loopback_target(("10.0.0.1", 80))
    assert not _loopback_target(("::1", 80, 0, 0))  # loopback, but not 127.0.0.0/8
    assert not _loopback_target(("example.com", 80))
    assert "loopback_only" in socket.socket.connect.__qualname__
    assert "loopback_only" in selector_events.BaseSelectorEventLoop.sock_connect.__qualname__


# --- stub resolution --------------------------------------------------------------------------


class StubResolver:
    """Names to addresses, counting lookups; an unknown name fails as DNS would."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answers = self.names.get(host.lower().rstrip("."))
        if answers is None:
            raise UrlFetchError(f"could not resolve {host}: unknown name")
        return answers


NAMES = {
    "internal.test": ["10.1.2.3"],
    "mixed.test": ["93.184.216.34", "192.168.0.7"],
    "public.test": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
    "docs.test": ["127.0.0.1"],
    "other.test": ["127.0.0.1"],
    "meta.test": ["169.254.169.254"],
    "corp.test": ["10.20.0.5"],
}


async def decide(host: str, allow: str = "") -> str | None:
    """The guard's answer for a URL's host: the first refusal among its addresses, or None."""
    addresses = await resolve(host, 80, resolver=StubResolver(NAMES))
    for address in addresses:
        reason = refusal(address, AllowList.parse(allow), host=host)
        if reason:
            return reason
    return None


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "refused: 127.0.0.1 is a loopback address"),
        ("127.1", "refused: 127.0.0.1 is a loopback address"),
        ("2130706433", "refused: 127.0.0.1 is a loopback address"),
        ("0177.0.0.1", "refused: 127.0.0.1 is a loopback address"),
        ("0x7f000001", "refused: 127.0.0.1 is a loopback address"),
        ("0x7f.1", "refused: 127.0.0.1 is a loopback address"),
        ("127.0.0.1.", "refused: 127.0.0.1 is a loopback address"),
        ("10.0.0.1", "refused: 10.0.0.1 is a private address"),
        ("172.16.5.4", "refused: 172.16.5.4 is a private address"),
        ("192.168.1.1", "refused: 192.168.1.1 is a private address"),
        ("169.254.169.254", "refused: 169.254.169.254 is a cloud metadata address"),
        ("169.254.1.1", "refused: 169.254.1.1 is a link-local address"),
        ("100.100.100.200", "refused: 100.100.100.200 is a cloud metadata address"),
        ("100.64.0.1", "refused: 100.64.0.1 is a carrier-grade NAT address"),
        ("0.0.0.0", "refused: 0.0.0.0 is an unspecified address"),
        ("0", "refused: 0.0.0.0 is an unspecified address"),
        ("224.0.0.1", "refused: 224.0.0.1 is a multicast address"),
        ("255.255.255.255", "refused: 255.255.255.255 is the broadcast address"),
        ("240.0.0.1", "refused: 240.0.0.1 is a reserved address"),
        ("192.0.2.10", "refused: 192.0.2.10 is a documentation address"),
        ("198.18.0.1", "refused: 198.18.0.1 is a benchmarking address"),
        ("[::1]", "refused: ::1 is a loopback address"),
        ("[::]", "refused: :: is an unspecified address"),
        ("[::ffff:10.0.0.1]", "refused: ::ffff:a00:1 (IPv4 10.0.0.1) is a private address"),
        ("[::ffff:127.0.0.1]", "refused: ::ffff:7f00:1 (IPv4 127.0.0.1) is a loopback address"),
        ("[::ffff:169.254.169.254]", "(IPv4 169.254.169.254) is a cloud metadata address"),
        ("[::127.0.0.1]", "(IPv4 127.0.0.1) is a loopback address"),
        ("[2002:a00:1::]", "(IPv4 10.0.0.1) is a private address"),
        ("[64:ff9b::7f00:1]", "(IPv4 127.0.0.1) is a loopback address"),
        ("[fd00::1]", "refused: fd00::1 is a private (unique local) address"),
        ("[fe80::1]", "refused: fe80::1 is a link-local address"),
        ("[fd00:ec2::254]", "refused: fd00:ec2::254 is a cloud metadata address"),
        ("[ff02::1]", "refused: ff02::1 is a multicast address"),
        ("[2001:db8::1]", "refused: 2001:db8::1 is a documentation address"),
        ("internal.test", "refused: internal.test resolves to 10.1.2.3, a private address"),
        ("INTERNAL.test.", "refused: INTERNAL.test. resolves to 10.1.2.3, a private address"),
        ("mixed.test", "refused: mixed.test resolves to 192.168.0.7, a private address"),
        ("meta.test", "refused: meta.test resolves to 169.254.169.254, a cloud metadata address"),
        # Public addresses are admitted: judged only, never connected to.
        ("93.184.216.34", None),
        ("8.8.8.8", None),
        ("[2606:4700:4700::1111]", None),
        ("[::ffff:8.8.8.8]", None),
        ("public.test", None),
    ],
)
async def test_the_guard_decides(host, reason):
    decision = await decide(host)
    if reason is None:
        assert decision is None
    else:
        assert decision is not None and decision.endswith(reason)


@pytest.mark.parametrize(
    ("host", "allow"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.0/8"),
        ("10.0.0.1", "10.0.0.0/8"),
        ("[::ffff:10.0.0.1]", "10.0.0.0/8"),  # judged as its IPv4, so the IPv4 network admits it
        ("[fd00::1]", "fd00::/8"),
        ("corp.test", "CORP.test"),  # names are exact and case-insensitive
        ("corp.test", "10.20.0.0/16"),
        ("meta.test", "169.254.169.254"),  # a metadata address only through a network entry
    ],
)
async def test_the_allow_list_admits(host, allow):
    assert await decide(host, allow) is None


@pytest.mark.parametrize(
    ("host", "allow", "reason"),
    [
        ("corp.test", "sub.corp.test, test", "resolves to 10.20.0.5, a private address"),  # no suffix match
        ("10.0.0.1", "corp.test", "10.0.0.1 is a private address"),  # a name admits only itself
        ("meta.test", "meta.test", "a cloud metadata address"),  # a name never admits metadata
        ("127.0.0.2", "127.0.0.1", "127.0.0.2 is a loopback address"),
    ],
)
async def test_the_allow_list_admits_nothing_more(host, allow, reason):
    decision = await decide(host, allow)
    assert decision is not None and decision.endswith(reason)


def test_allow_list_parsing():
    allow = AllowList.parse(" Docs.Internal. , 10.1.0.0/16,[::1], 127.1,,fd00::/8 ")
    assert allow.hosts == {"docs.internal"}
    assert {str(network) for network in allow.networks} == {"10.1.0.0/16", "::1/128", "127.0.0.1/32", "fd00::/8"}
    assert not AllowList.parse("")
    for bad in ("10.0.0.0/33", "host:8080", "a b"):
        with pytest.raises(ValueError, match="url_allow"):
            AllowList.parse(bad)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7F.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("192.168.257", "192.168.1.1"),
        ("0xa.0.0.1", "10.0.0.1"),
    ],
)
def test_numeric_hosts_mean_what_inet_aton_says(host, address):
    assert str(numeric_host(host)) == address == socket.inet_ntoa(socket.inet_aton(host))


@pytest.mark.parametrize("host", ["1.2.3.4.5", "256.1.1.1", "1.16777216", "08.0.0.1", "0x.1", "4294967296", "docs.1"])
def test_a_host_ending_in_a_number_is_an_address_or_refused(host):
    with pytest.raises(UrlRefused, match="not a valid IPv4 address"):
        numeric_host(host)


def test_names_are_names():
    for host in ("example.com", "1.example", "0x7f.example", "docs.test."):
        assert numeric_host(host) is None


async def test_resolve_asks_the_resolver_for_names_only():
    stub = StubResolver({"public.test": ["93.184.216.34", "93.184.216.34", "2606:2800:220:1::1"]})
    assert await resolve("2130706433", 80, resolver=stub) == [ipaddress.ip_address("127.0.0.1")]
    assert await resolve("[::1]", 80, resolver=stub) == [ipaddress.ip_address("::1")]
    assert stub.calls == []
    addresses = await resolve("public.test", 80, resolver=stub)
    assert [str(a) for a in addresses] == ["93.184.216.34", "2606:2800:220:1::1"]
    with pytest.raises(UrlFetchError, match="could not resolve nowhere.test"):
        await resolve("nowhere.test", 80, resolver=stub)


async def test_the_default_resolver_is_getaddrinfo(monkeypatch):
    seen = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        seen.append((host, port))
        if host != "docs.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1%eth0", port, 0, 2)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert [str(a) for a in await resolve("docs.test", 443)] == ["10.9.8.7", "fe80::1"]
    assert await resolve("0x7f.1", 443) == [ipaddress.ip_address("127.0.0.1")]  # never reaches getaddrinfo
    with pytest.raises(UrlFetchError, match="could not resolve gone.test"):
        await resolve("gone.test", 443)
    assert seen == [("docs.test", 443), ("gone.test", 443)]


# --- fetching from loopback servers -----------------------------------------------------------


class Site:
    """An aiohttp server on 127.0.0.1 that records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[web.Request] = []
        self.app = web.Application(middlewares=[self._record])
        self.server: TestServer | None = None

    @web.middleware
    async def _record(self, request, handler):
        self.requests.append(request)
        return await handler(request)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    def paths(self) -> list[str]:
        return [request.path_qs for request in self.requests]

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Site:
        self.server = TestServer(self.app, host="127.0.0.1")
        await self.server.start_server(ssl=ssl_context)
        return self

    async def close(self) -> None:
        assert self.server is not None
        await self.server.close()


async def page(request):
    return web.Response(text="<html><title>Hi</title><p>Hello</p></html>", content_type="text/html")


async def pdf_as_text(request):
    return web.Response(body=PDF, content_type="text/plain")


async def hop(request):
    left = int(request.match_info["left"])
    target = "/page.html" if left == 0 else f"/hop/{left - 1}"
    response = web.HTTPFound(target)
    response.set_cookie("session", f"hop{left}")
    raise response


async def redirect_to(request):
    raise web.HTTPTemporaryRedirect(request.query["url"])


async def big(request):
    return web.Response(body=b"x" * (CAP + 1), content_type="application/octet-stream")


async def big_chunked(request):
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for _ in range(64):
            await response.write(b"y" * 1024)
            await asyncio.sleep(0)
    except (ConnectionError, RuntimeError):
        pass
    return response


async def bomb(request):
    body = gzip.compress(b"z" * (CAP * 16))
    assert len(body) < CAP
    return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})


async def small_gzip(request):
    return web.Response(
        body=gzip.compress(b"w" * 1000), headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    )


async def slow(request):
    await asyncio.sleep(5)
    return web.Response(text="too late")


async def slow_body(request):
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    try:
        for _ in range(50):
            await response.write(b"drip ")
            await asyncio.sleep(0.1)
    except (ConnectionError, RuntimeError):
        pass
    return response


def build_site() -> Site:
    site = Site()
    site.app.router.add_get("/page.html", page)
    site.app.router.add_get("/doc.pdf", pdf_as_text)
    site.app.router.add_get("/hop/{left}", hop)
    site.app.router.add_get("/to", redirect_to)
    site.app.router.add_get("/big", big)
    site.app.router.add_get("/big-chunked", big_chunked)
    site.app.router.add_get("/bomb", bomb)
    site.app.router.add_get("/small-gzip", small_gzip)
    site.app.router.add_get("/slow", slow)
    site.app.router.add_get("/slow-body", slow_body)
    return site


@pytest.fixture
async def site():
    server = await build_site().start()
    yield server
    await server.close()


@pytest.fixture
async def forbidden():
    """A loopback server the allow-list does not admit: nothing may ever reach it."""
    server = build_site()
    await server.start()
    yield server
    await server.close()
    assert server.requests == []


def settings(**overrides) -> Settings:
    values = dict(url_allow="127.0.0.1", url_max_bytes=CAP, url_timeout_seconds=3.0, url_max_redirects=3)
    values.update(overrides)
    return Settings(**values)


async def test_an_html_page(site):
    fetched = await fetch_url(f"http://127.0.0.1:{site.port}/page.html", settings())
    assert fetched == Fetched(
        final_url=f"http://127.0.0.1:{site.port}/page.html",
        content_type="text/html; charset=utf-8",
        data=b"<html><title>Hi</title><p>Hello</p></html>",
        redirects=[],
    )
    headers = site.requests[0].headers
    assert headers["User-Agent"] == USER_AGENT and USER_AGENT.startswith("docflow/")
    assert "gzip" in headers["Accept-Encoding"]
    assert "Cookie" not in headers


async def test_content_type_is_what_the_server_said(site):
    fetched = await fetch_url(f"http://127.0.0.1:{site.port}/doc.pdf", settings())
    assert fetched.content_type.startswith("text/plain")
    assert fetched.data == PDF  # the caller sniffs %PDF


async def test_a_chain_of_three_redirects_is_followed_without_cookies(site):
    base = f"http://127.0.0.1:{site.port}"
    fetched = await fetch_url(f"{base}/hop/2#frag", settings(url_max_redirects=3))
    assert fetched.final_url == f"{base}/page.html"
    assert fetched.redirects == [f"{base}/hop/2", f"{base}/hop/1", f"{base}/hop/0"]
    assert fetched.data.startswith(b"<html>")
    assert site.paths() == ["/hop/2", "/hop/1", "/hop/0", "/page.html"]
    assert all("Cookie" not in request.headers for request in site.requests)


async def test_too_many_redirects_are_refused(site):
    with pytest.raises(UrlFetchError, match="too many redirects") as caught:
        await fetch_url(f"http://127.0.0.1:{site.port}/hop/3", settings(url_max_redirects=2))
    assert "/hop/1" in str(caught.value)
    assert site.paths() == ["/hop/3", "/hop/2", "/hop/1"]


async def test_no_redirects_allowed(site):
    with pytest.raises(UrlFetchError, match="too many redirects"):
        await fetch_url(f"http://127.0.0.1:{site.port}/hop/0", settings(url_max_redirects=0))


async def test_a_redirect_to_the_metadata_service_is_refused_before_any_request(site, loopback_only):
    url = f"http://127.0.0.1:{site.port}/to?url=http://169.254.169.254/latest/meta-data/"
    with pytest.raises(UrlRefused, match=r"refused: 169\.254\.169\.254 is a cloud metadata address"):
        await fetch_url(url, settings())
    assert {address[0] for address in loopback_only} == {"127.0.0.1"}
    assert len(site.requests) == 1


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/page.html",  # the address is loopback; only the name docs.test is allowed
        "http://other.test:{port}/page.html",  # another name for the same loopback address
        "http://2130706433:{port}/page.html",
        "http://[::ffff:127.0.0.1]:{port}/page.html",
    ],
)
async def test_a_redirect_to_a_loopback_port_not_admitted_is_refused(site, forbidden, target):
    resolver = StubResolver(NAMES)
    location = target.format(port=forbidden.port)
    url = f"http://docs.test:{site.port}/to?url={location}"
    with pytest.raises(UrlRefused, match="is a loopback address|resolves to 127.0.0.1, a loopback address"):
        await fetch_url(url, settings(url_allow="docs.test"), resolver=resolver)
    assert len(site.requests) == 1 and forbidden.requests == []


async def test_a_redirect_to_another_scheme_is_refused(site):
    with pytest.raises(UrlRefused, match="only http and https URLs are fetched"):
        await fetch_url(f"http://127.0.0.1:{site.port}/to?url=file:///etc/passwd", settings())


async def test_an_allow_listed_name_is_fetched_and_resolved_once_per_hop(site, loopback_only):
    resolver = StubResolver(NAMES)
    base = f"http://docs.test:{site.port}"
    fetched = await fetch_url(f"{base}/hop/1", settings(url_allow="docs.test"), resolver=resolver)
    assert fetched.final_url == f"{base}/page.html"
    assert resolver.calls == ["docs.test"] * 3
    assert all(request.host == f"docs.test:{site.port}" for request in site.requests)
    assert {address[0] for address in loopback_only} == {"127.0.0.1"}


async def test_every_hop_is_judged_again(site):
    """A name that answers loopback (allowed) first and a private address next is refused on the hop."""
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])

    async def rebinding(host, port):
        return next(answers)

    with pytest.raises(UrlRefused, match="refused: flip.test resolves to 10.0.0.1, a private address"):
        await fetch_url(f"http://flip.test:{site.port}/hop/0", settings(), resolver=rebinding)
    assert site.paths() == ["/hop/0"]


async def test_the_url_itself_is_judged(site, forbidden, loopback_only):
    for url, reason in [
        (f"http://2130706433:{forbidden.port}/", "refused: 127.0.0.1 is a loopback address"),
        (f"http://0x7f.1:{forbidden.port}/", "refused: 127.0.0.1 is a loopback address"),
        (f"http://[::1]:{forbidden.port}/", "refused: ::1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "refused: 169.254.169.254 is a cloud metadata address"),
        ("http://10.0.0.1/", "refused: 10.0.0.1 is a private address"),
        ("ftp://127.0.0.1/", "only http and https URLs are fetched"),
        ("file:///etc/passwd", "only http and https URLs are fetched"),
        ("http://user:secret@127.0.0.1/", "user name or password"),
        ("http://exa mple.test/", "not a valid host name"),
        ("http://1.2.3.4.5/", "not a valid IPv4 address"),
    ]:
        with pytest.raises(UrlRefused) as caught:
            await fetch_url(url, settings(url_allow=""), resolver=StubResolver(NAMES))
        assert reason in str(caught.value), url
        assert isinstance(caught.value, ExtractionError)
    assert loopback_only == []


async def test_a_numeric_host_admitted_is_fetched_as_its_address(site):
    fetched = await fetch_url(f"http://2130706433:{site.port}/page.html", settings(url_allow="127.0.0.0/8"))
    assert fetched.final_url == f"http://127.0.0.1:{site.port}/page.html"
    assert site.requests[0].host == f"127.0.0.1:{site.port}"


async def test_a_body_over_the_cap_is_refused_from_its_content_length(site):
    with pytest.raises(UrlFetchError, match=f"{CAP + 1} bytes, more than the {CAP} bytes"):
        await fetch_url(f"http://127.0.0.1:{site.port}/big", settings())
    assert (await fetch_url(f"http://127.0.0.1:{site.port}/big", settings(url_max_bytes=CAP + 1))).data == (
        b"x" * (CAP + 1)
    )


async def test_a_body_over_the_cap_is_refused_while_streaming(site):
    with pytest.raises(UrlFetchError, match=f"more than the {CAP} bytes"):
        await fetch_url(f"http://127.0.0.1:{site.port}/big-chunked", settings())


async def test_the_cap_counts_decoded_bytes(site):
    with pytest.raises(UrlFetchError, match=f"more than the {CAP} bytes"):
        await fetch_url(f"http://127.0.0.1:{site.port}/bomb", settings())
    fetched = await fetch_url(f"http://127.0.0.1:{site.port}/small-gzip", settings())
    assert fetched.data == b"w" * 1000


async def test_a_slow_server_runs_out_of_time(site):
    started = time.monotonic()
    with pytest.raises(UrlFetchError, match="took longer than 0.5 s"):
        await fetch_url(f"http://127.0.0.1:{site.port}/slow", settings(url_timeout_seconds=0.5))
    with pytest.raises(UrlFetchError, match="took longer than 0.5 s"):
        await fetch_url(f"http://127.0.0.1:{site.port}/slow-body", settings(url_timeout_seconds=0.5))
    assert time.monotonic() - started < 3


async def test_a_slow_resolver_counts_against_the_time_limit():
    async def hanging(host, port):
        await asyncio.sleep(5)
        return ["127.0.0.1"]

    with pytest.raises(UrlFetchError, match="took longer than 0.3 s"):
        await fetch_url("http://docs.test/", settings(url_timeout_seconds=0.3), resolver=hanging)


async def test_a_404_is_a_fetch_error_with_its_status(site):
    with pytest.raises(UrlFetchError, match="answered HTTP 404 Not Found") as caught:
        await fetch_url(f"http://127.0.0.1:{site.port}/missing", settings())
    assert caught.value.status == 404


async def test_a_closed_port_is_a_fetch_error():
    from pipeline.local.ports import free_port

    with pytest.raises(UrlFetchError, match="could not fetch"):
        await fetch_url(f"http://127.0.0.1:{free_port()}/", settings())


# --- TLS: the pinned address, verified by the host name --------------------------------------


def _certificates(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("docflow test CA"))
        .issuer_name(name("docflow test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("docs.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("docs.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(ca_file))
    return server, client


async def test_tls_is_verified_by_host_name_although_the_address_is_pinned(tmp_path):
    server_context, client_context = _certificates(tmp_path)
    site = await build_site().start(ssl_context=server_context)
    try:
        resolver = StubResolver(NAMES)
        allow = settings(url_allow="docs.test, other.test")
        fetched = await fetch_url(
            f"https://docs.test:{site.port}/page.html", allow, resolver=resolver, ssl_context=client_context
        )
        assert fetched.data.startswith(b"<html>") and fetched.final_url.startswith("https://docs.test:")
        # The same address under a name the certificate does not carry fails verification.
        with pytest.raises(UrlFetchError, match="TLS failed.*not valid for 'other.test'"):
            await fetch_url(
                f"https://other.test:{site.port}/page.html", allow, resolver=resolver, ssl_context=client_context
            )
        # And without the test CA, the default context trusts nothing of it.
        with pytest.raises(UrlFetchError, match="TLS failed.*CERTIFICATE_VERIFY_FAILED"):
            await fetch_url(f"https://docs.test:{site.port}/page.html", allow, resolver=resolver)
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        with pytest.raises(ValueError, match="must verify"):
            await fetch_url(f"https://docs.test:{site.port}/", allow, resolver=resolver, ssl_context=unverified)
    finally:
        await site.close()
