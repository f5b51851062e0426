"""The SSRF guard in the webhook and registry channels, against real servers on
loopback: refused addresses give a clear permanent outcome and no connection is made;
``allow_private = true`` reaches the local server; the address checked is the address
connected to; TLS still verifies the host name.

No test sends traffic to a non-loopback address: the guard refuses those before
connecting, and a tripwire under it (httpcore's own backend, patched) refuses any
connection to a non-loopback address or to a host name, so that a broken guard fails
these tests instead of reaching the network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpcore
import httpx
import pytest
import trustme
from builders import make_task
from pydantic import ValidationError

from notice_relay import netguard
from notice_relay.channels import Channel, RegistryChannel, WebhookChannel
from notice_relay.connectors import Developer, RegistryChannelConfig, WebhookChannelConfig
from notice_relay.errors import AddressRefused
from notice_relay.models import ChannelType, DeliveryTask, OutcomeKind
from notice_relay.netguard import GuardedBackend, guarded_transport

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
TOKEN = "reg-token-123"
KINDS = ["webhook", "registry"]
HINT = "set allow_private = true in the connector to allow it"


# ----------------------------------------------------------------------------- tripwire


@dataclass
class Tripwire:
    """Every host the real network backend was asked to connect to."""

    attempts: list[str] = field(default_factory=list)


@pytest.fixture(autouse=True)
def tripwire(monkeypatch: pytest.MonkeyPatch) -> Tripwire:
    """Under the guard, httpcore's backend refuses anything but a loopback IP literal."""
    wire = Tripwire()
    original = httpcore.AnyIOBackend.connect_tcp

    async def connect_tcp(
        self: httpcore.AnyIOBackend, host: str, port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        local_address: str | None = None, socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        wire.attempts.append(host)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise httpcore.ConnectError(f"tripwire: the test tried to connect to {host}")
        return await original(self, host, port, timeout=timeout, local_address=local_address,
                              socket_options=socket_options)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)

    # The same tripwire under aiohttp's guard (NOTICE_RELAY_HTTP_CLIENT=aiohttp or
    # httpx-aiohttp): the socket addresses aiohttp is about to connect to.
    original_wrap = aiohttp.TCPConnector._wrap_create_connection

    async def wrap_create_connection(self: aiohttp.TCPConnector, *args: Any,
                                     addr_infos: list[Any], **kwargs: Any) -> Any:
        hosts = [str(info[4][0]) for info in addr_infos]
        wire.attempts.extend(hosts)
        if not all(ipaddress.ip_address(h).is_loopback for h in hosts):
            raise aiohttp.ClientConnectorError(
                kwargs["req"].connection_key, OSError(f"tripwire: tried to connect to {hosts}"))
        return await original_wrap(self, *args, addr_infos=addr_infos, **kwargs)

    monkeypatch.setattr(aiohttp.TCPConnector, "_wrap_create_connection", wrap_create_connection)
    return wire


# ------------------------------------------------------------------------------ servers


@dataclass
class CountingServer:
    """A real HTTP/1.1 server that counts TCP connections and answers 200: a receipt
    for a webhook, an accepted result per item for a registry batch."""

    port: int = 0
    connections: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")[1:]
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines if ":" in line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((headers, body))
            document = json.loads(body)
            answer: dict[str, Any]
            if "items" in document:
                answer = {"results": [{"id": item["id"], "status": "accepted",
                                       "receipt": f"r-{item['id']}"} for item in document["items"]]}
            else:
                answer = {"receipt": "r-webhook"}
            payload = json.dumps(answer).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


async def _serve(host: str, ssl_context: ssl.SSLContext | None = None) -> tuple[
    CountingServer, asyncio.Server
]:
    server = CountingServer()
    srv = await asyncio.start_server(server.handle, host, 0, ssl=ssl_context)
    server.port = srv.sockets[0].getsockname()[1]
    return server, srv


@pytest.fixture
async def local() -> AsyncIterator[CountingServer]:
    """A counting server on 127.0.0.1."""
    server, srv = await _serve("127.0.0.1")
    try:
        yield server
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.fixture
async def local6() -> AsyncIterator[CountingServer]:
    """A counting server on ::1 (skipped where IPv6 loopback is unavailable)."""
    try:
        server, srv = await _serve("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        yield server
    finally:
        srv.close()
        await srv.wait_closed()


# ----------------------------------------------------------------------------- channels


def _channel(kind: str, url: str, *, allow_private: bool = False,
             client: httpx.AsyncClient | None = None) -> tuple[Channel, DeliveryTask]:
    """A webhook or registry channel for ``url`` (its own guarded client unless given)
    and a task for it."""
    base: dict[str, Any] = {"url": url, "secret_env": "S", "timeout": "2s"} \
        if kind == "webhook" else {"base_url": url, "token_env": "T"}
    developer = Developer.model_validate({
        "id": "acme-ai", "name": "Acme AI", "accepts": ["train-ai"],
        "channel": [{"type": kind, "allow_http": url.startswith("http:"),
                     "allow_private": allow_private, **base}],
    })
    config = developer.channels[0]
    channel: Channel
    if isinstance(config, WebhookChannelConfig):
        channel = WebhookChannel(developer, config, [SECRET], client=client)
    else:
        assert isinstance(config, RegistryChannelConfig)
        channel = RegistryChannel(developer, config, TOKEN, client=client, timeout=2)
    task = make_task(channel=config.name, channel_type=ChannelType(kind))
    return channel, task


async def _send_one(channel: Channel, task: DeliveryTask) -> Any:
    try:
        [outcome] = await channel.send([task])
    finally:
        await channel.aclose()
    return outcome


def _fake_resolver(table: dict[str, list[str]], calls: list[tuple[str, int]] | None = None) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return resolve


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", KINDS)
async def test_loopback_literal_is_refused_and_nothing_connects(
    kind: str, local: CountingServer, tripwire: Tripwire
) -> None:
    """http://127.0.0.1:<port> without allow_private: permanent, the error names the
    address and the setting, and the server on that port sees no connection."""
    outcome = await _send_one(*_channel(kind, f"http://127.0.0.1:{local.port}/"))
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error == f"refused to connect to 127.0.0.1 (loopback address); {HINT}"
    assert outcome.status_code is None
    assert local.connections == 0
    assert tripwire.attempts == []


@pytest.mark.parametrize("kind", KINDS)
async def test_ipv6_loopback_is_refused_and_nothing_connects(
    kind: str, local6: CountingServer, tripwire: Tripwire
) -> None:
    """http://[::1]:<port> without allow_private: permanent, no connection."""
    outcome = await _send_one(*_channel(kind, f"http://[::1]:{local6.port}/"))
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error == f"refused to connect to ::1 (loopback address); {HINT}"
    assert local6.connections == 0
    assert tripwire.attempts == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("url", "address", "what"),
    [
        ("http://10.0.0.1/", "10.0.0.1", "private"),
        ("http://192.168.1.10:8080/hook", "192.168.1.10", "private"),
        ("http://100.64.0.1/", "100.64.0.1", "carrier-grade NAT"),
        ("http://169.254.1.1/", "169.254.1.1", "link-local"),
        ("http://[fe80::1]/", "fe80::1", "link-local"),
        ("http://[fc00::5]/", "fc00::5", "private"),
        ("http://[::ffff:10.0.0.1]/", "::ffff:10.0.0.1", "private"),
        ("http://0.0.0.0/", "0.0.0.0", "unspecified"),
        ("http://224.0.0.1/", "224.0.0.1", "multicast"),
    ],
)
async def test_private_addresses_are_refused_before_connecting(
    kind: str, url: str, address: str, what: str, tripwire: Tripwire
) -> None:
    """Private, CGNAT, link-local, unique-local, IPv4-mapped, unspecified and multicast
    literals are refused at once, without a connection attempt."""
    outcome = await asyncio.wait_for(_send_one(*_channel(kind, url)), 5)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error == f"refused to connect to {address} ({what} address); {HINT}"
    assert tripwire.attempts == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254"),
        ("http://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254"),
    ],
)
async def test_cloud_metadata_is_refused_even_when_private_is_allowed(
    kind: str, allow_private: bool, url: str, address: str, tripwire: Tripwire
) -> None:
    """The metadata endpoint is refused without a connection attempt, whatever the
    connector says."""
    channel, task = _channel(kind, url, allow_private=allow_private)
    outcome = await asyncio.wait_for(_send_one(channel, task), 5)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error == (
        f"refused to connect to {address} (cloud metadata address); "
        "cloud metadata endpoints are never allowed"
    )
    assert tripwire.attempts == []


@pytest.mark.parametrize("kind", KINDS)
async def test_a_name_resolving_to_loopback_is_refused(
    kind: str, local: CountingServer, tripwire: Tripwire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host name whose (patched) resolver answers 127.0.0.1 is refused, naming the
    address and the host; the resolver is the one seam the guard asks."""
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(netguard, "resolve_host", _fake_resolver(
        {"hooks.example.invalid": ["127.0.0.1"]}, calls))
    outcome = await _send_one(*_channel(kind, f"http://hooks.example.invalid:{local.port}/"))
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error == (
        f"refused to connect to 127.0.0.1 (loopback address) for hooks.example.invalid; {HINT}"
    )
    assert calls == [("hooks.example.invalid", local.port)]
    assert local.connections == 0
    assert tripwire.attempts == []


@pytest.mark.parametrize("kind", KINDS)
async def test_localhost_is_refused_through_the_system_resolver(
    kind: str, local: CountingServer, tripwire: Tripwire
) -> None:
    """``localhost``, resolved by the system resolver, is loopback and refused."""
    outcome = await _send_one(*_channel(kind, f"http://localhost:{local.port}/"))
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error is not None
    assert "(loopback address) for localhost; set allow_private = true" in outcome.error
    assert local.connections == 0
    assert tripwire.attempts == []


@pytest.mark.parametrize("kind", KINDS)
async def test_one_private_record_refuses_the_whole_name(
    kind: str, tripwire: Tripwire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name with a public and a private address is refused before any connection:
    the guard checks every address first."""
    monkeypatch.setattr(netguard, "resolve_host", _fake_resolver(
        {"mixed.example.invalid": ["93.184.216.34", "10.1.2.3"]}))
    outcome = await asyncio.wait_for(
        _send_one(*_channel(kind, "http://mixed.example.invalid/")), 5)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error == (
        f"refused to connect to 10.1.2.3 (private address) for mixed.example.invalid; {HINT}"
    )
    assert tripwire.attempts == []


@pytest.mark.parametrize("kind", KINDS)
async def test_allow_private_reaches_the_loopback_server(
    kind: str, local: CountingServer, tripwire: Tripwire
) -> None:
    """With allow_private = true, the 127.0.0.1 server is reached and delivers."""
    channel, task = _channel(kind, f"http://127.0.0.1:{local.port}/", allow_private=True)
    outcome = await _send_one(channel, task)
    assert outcome.kind is OutcomeKind.DELIVERED, outcome.error
    assert local.connections == 1
    assert tripwire.attempts == ["127.0.0.1"]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_checked_address_is_the_one_connected_to(
    kind: str, local: CountingServer, tripwire: Tripwire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With allow_private, a name is resolved once by the guard's resolver and the
    connection goes to that IP literal (the backend never sees the name, so it cannot
    resolve it again), while the Host header keeps the name."""
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(netguard, "resolve_host", _fake_resolver(
        {"hooks.example.invalid": ["127.0.0.1"]}, calls))
    channel, task = _channel(kind, f"http://hooks.example.invalid:{local.port}/",
                             allow_private=True)
    outcome = await _send_one(channel, task)
    assert outcome.kind is OutcomeKind.DELIVERED, outcome.error
    assert calls == [("hooks.example.invalid", local.port)]
    assert tripwire.attempts == ["127.0.0.1"]
    [(headers, _)] = local.requests
    assert headers["host"] == f"hooks.example.invalid:{local.port}"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_name_that_does_not_resolve_is_transient(
    kind: str, tripwire: Tripwire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS failure is a connection failure: transient, naming the host."""
    monkeypatch.setattr(netguard, "resolve_host", _fake_resolver({}))
    outcome = await _send_one(*_channel(kind, "http://gone.example.invalid/"))
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith("connection failed: cannot resolve gone.example.invalid")
    assert tripwire.attempts == []


# ------------------------------------------------- the guard itself (no sockets at all)


class _RecordingBackend(httpcore.AsyncNetworkBackend):
    """A network backend that opens nothing: it records where it was asked to go."""

    def __init__(self) -> None:
        self.hosts: list[str] = []

    async def connect_tcp(
        self, host: str, port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        local_address: str | None = None, socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.hosts.append(host)
        return httpcore.AsyncMockStream([])


async def test_dns_rebinding_cannot_slip_between_check_and_connect() -> None:
    """A resolver that answers a public address, then a private one (rebinding), is
    asked once per connection, and the wrapped backend is given the checked IP
    literal, never the name."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> Sequence[str]:
        calls.append(host)
        return next(answers)

    inner = _RecordingBackend()
    guard = GuardedBackend(allow_private=False, resolver=rebinding, backend=inner)
    await guard.connect_tcp("rebind.example.invalid", 443, timeout=1)
    assert calls == ["rebind.example.invalid"]
    assert inner.hosts == ["93.184.216.34"]
    with pytest.raises(AddressRefused, match=r"127\.0\.0\.1 \(loopback address\)"):
        await guard.connect_tcp("rebind.example.invalid", 443, timeout=1)
    assert inner.hosts == ["93.184.216.34"]


async def test_unix_sockets_are_refused() -> None:
    """Channels never connect over Unix sockets; the guard refuses them."""
    guard = GuardedBackend(allow_private=True, backend=_RecordingBackend())
    with pytest.raises(Exception, match="Unix socket"):
        await guard.connect_unix_socket("/run/docker.sock")


def test_http_without_allow_http_is_refused_when_the_connector_is_loaded() -> None:
    """https is required unless allow_http = true: a connector with an http:// URL
    fails validation at start-up, naming the field."""
    for channel in (
        {"type": "webhook", "url": "http://hooks.example.invalid/", "secret_env": "S"},
        {"type": "registry", "base_url": "http://reg.example.invalid/", "token_env": "T"},
    ):
        with pytest.raises(ValidationError, match="must be https://"):
            Developer.model_validate({"id": "a", "name": "A", "accepts": ["train-ai"],
                                      "channel": [channel]})


# ------------------------------------------------------------ TLS keeps the host name


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


async def _tls_registry_outcome(
    ca: trustme.CA, cert_name: str, tripwire: Tripwire
) -> tuple[Any, list[str | None]]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(cert_name).configure_cert(server_ctx)
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    server, srv = await _serve("127.0.0.1", server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    transport = guarded_transport(
        allow_private=True, verify=client_ctx,
        resolver=_fake_resolver({"registry.example.invalid": ["127.0.0.1"]}),
    )
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            channel, task = _channel(
                "registry", f"https://registry.example.invalid:{server.port}/",
                allow_private=True, client=client,
            )
            outcome = await _send_one(channel, task)
    finally:
        srv.close()
        await srv.wait_closed()
    assert tripwire.attempts == ["127.0.0.1"]
    return outcome, sni


async def test_tls_verifies_the_host_name_not_the_address(
    ca: trustme.CA, tripwire: Tripwire
) -> None:
    """Connecting to the resolved IP keeps TLS on the name: SNI is the host name and a
    certificate for that name (not for 127.0.0.1) verifies."""
    outcome, sni = await _tls_registry_outcome(ca, "registry.example.invalid", tripwire)
    assert outcome.kind is OutcomeKind.DELIVERED, outcome.error
    assert sni == ["registry.example.invalid"]


async def test_tls_refuses_a_certificate_for_another_name(
    ca: trustme.CA, tripwire: Tripwire
) -> None:
    """A certificate for another name fails verification: no delivery."""
    outcome, sni = await _tls_registry_outcome(ca, "other.example.invalid", tripwire)
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.error
    assert sni == ["registry.example.invalid"]
