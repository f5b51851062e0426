"""The SSRF guard of the HTTP channels: which addresses a notice may be sent to, checked
on the address actually connected to.

A webhook URL or a registry base URL names a host that a developer controls, and so
does that host's DNS. Without a guard, a developer (or whoever takes over their DNS)
could point the name at ``10.0.0.5``, ``127.0.0.1`` or the cloud metadata service, and
the relay would POST from inside the operator's network. So:

- **https only**, unless the connector sets ``allow_http = true``. This is checked when
  the connector file is loaded (:mod:`notice_relay.connectors`): a bad URL stops the
  worker at start-up with an error naming the file and the field, instead of failing
  every delivery later. Redirects are never followed, so the scheme cannot change.
- **Public addresses only**, unless the connector sets ``allow_private = true``
  (dev/test). :func:`classify_address` names what is refused: private (10/8,
  172.16/12, 192.168/16, fc00::/7, fec0::/10), loopback (127/8, ::1), link-local
  (169.254/16, fe80::/10), carrier-grade NAT (100.64/10), multicast (224/4, ff00::/8),
  unspecified (0.0.0.0, ::), reserved (0/8, 240/4, documentation, benchmarking and
  other special-purpose ranges) and cloud metadata endpoints. IPv4 addresses embedded
  in IPv6 (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``)
  are judged by the IPv4 address they reach.
- **Cloud metadata endpoints are refused even with** ``allow_private = true``: no
  local test server lives there, and they hold the credentials of the machine.

How it hooks into httpx: httpx 0.28 hands each new connection to an httpcore network
backend (``connect_tcp(host, port, ...)``, where ``host`` is the URL's host). The
transport from :func:`guarded_transport` carries a :class:`GuardedBackend`, which
resolves the host itself (through one resolver function, :func:`resolve_host`, which
tests replace), refuses the connection if any address is not allowed, and otherwise
connects to the checked IP literal. The default backend never sees a host name, so it
never resolves one again: there is no gap between the check and the connect for DNS
rebinding to use. httpcore keeps using the URL's host name for the TLS handshake
(``server_hostname`` is taken from the request's origin, not from the socket), so SNI
and certificate verification are unchanged, and so is the ``Host`` header.

A refusal raises :class:`~notice_relay.errors.AddressRefused` (a permanent channel
error), which passes through httpx untranslated and becomes the task's permanent
outcome.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from enum import StrEnum
from typing import Final

import aiohttp
import httpcore
import httpx

from notice_relay.errors import AddressRefused, PermanentChannelError, TransientChannelError

__all__ = [
    "METADATA_ADDRESSES",
    "AddressKind",
    "GuardedBackend",
    "GuardedConnector",
    "IPAddress",
    "Resolver",
    "classify_address",
    "guarded_connector",
    "guarded_transport",
    "refusal_message",
    "resolve_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``resolver(host, port)`` → the host's addresses as strings, in connection order.
Raises :class:`OSError` (e.g. :class:`socket.gaierror`) when the name does not resolve."""


class AddressKind(StrEnum):
    """Why an address is not a public one."""

    PRIVATE = "private"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"
    CGNAT = "carrier-grade NAT"
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"
    RESERVED = "reserved"
    METADATA = "cloud metadata"


#: Cloud metadata endpoints: refused whatever the connector says.
METADATA_ADDRESSES: Final[frozenset[IPAddress]] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean... instance metadata
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure WireServer (a public address, but never a receiver)
    )
)

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# First match wins, so the more specific networks come first.
_V4_RULES: Final[tuple[tuple[ipaddress.IPv4Network, AddressKind], ...]] = (
    (_V4("0.0.0.0/32"), AddressKind.UNSPECIFIED),
    (_V4("0.0.0.0/8"), AddressKind.RESERVED),  # "this network"
    (_V4("10.0.0.0/8"), AddressKind.PRIVATE),
    (_V4("100.64.0.0/10"), AddressKind.CGNAT),
    (_V4("127.0.0.0/8"), AddressKind.LOOPBACK),
    (_V4("169.254.0.0/16"), AddressKind.LINK_LOCAL),
    (_V4("172.16.0.0/12"), AddressKind.PRIVATE),
    (_V4("192.0.0.0/24"), AddressKind.RESERVED),  # IETF protocol assignments
    (_V4("192.0.2.0/24"), AddressKind.RESERVED),  # documentation (TEST-NET-1)
    (_V4("192.88.99.0/24"), AddressKind.RESERVED),  # 6to4 relay anycast (deprecated)
    (_V4("192.168.0.0/16"), AddressKind.PRIVATE),
    (_V4("198.18.0.0/15"), AddressKind.RESERVED),  # benchmarking
    (_V4("198.51.100.0/24"), AddressKind.RESERVED),  # documentation (TEST-NET-2)
    (_V4("203.0.113.0/24"), AddressKind.RESERVED),  # documentation (TEST-NET-3)
    (_V4("224.0.0.0/4"), AddressKind.MULTICAST),
    (_V4("240.0.0.0/4"), AddressKind.RESERVED),  # future use, and 255.255.255.255
)

_V6_RULES: Final[tuple[tuple[ipaddress.IPv6Network, AddressKind], ...]] = (
    (_V6("::/128"), AddressKind.UNSPECIFIED),
    (_V6("::1/128"), AddressKind.LOOPBACK),
    (_V6("::/96"), AddressKind.RESERVED),  # IPv4-compatible (deprecated)
    (_V6("64:ff9b:1::/48"), AddressKind.RESERVED),  # local-use NAT64: reaches anything
    (_V6("100::/64"), AddressKind.RESERVED),  # discard-only
    (_V6("2001:db8::/32"), AddressKind.RESERVED),  # documentation
    (_V6("2001::/23"), AddressKind.RESERVED),  # IETF protocol assignments, Teredo
    (_V6("3fff::/20"), AddressKind.RESERVED),  # documentation (RFC 9637)
    (_V6("fc00::/7"), AddressKind.PRIVATE),  # unique local
    (_V6("fe80::/10"), AddressKind.LINK_LOCAL),
    (_V6("fec0::/10"), AddressKind.PRIVATE),  # site-local (deprecated)
    (_V6("ff00::/8"), AddressKind.MULTICAST),
)

_NAT64: Final = _V6("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, for the forms that translate to one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(address.packed[-4:])
    return address.sixtofour


def classify_address(address: str | IPAddress) -> AddressKind | None:
    """What kind of non-public address ``address`` is; ``None`` for a public one.

    Pure: nothing is resolved or contacted. IPv6 forms that reach an IPv4 address
    (IPv4-mapped, NAT64, 6to4) are judged by that IPv4 address. Raises
    :class:`ValueError` for a string that is not an IP address.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if ip in METADATA_ADDRESSES:
        return AddressKind.METADATA
    if isinstance(ip, ipaddress.IPv6Address):
        # The scope of a link-local address ("fe80::1%eth0") does not change its kind.
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return classify_address(embedded)
        for network6, kind in _V6_RULES:
            if ip in network6:
                return kind
    else:
        for network4, kind in _V4_RULES:
            if ip in network4:
                return kind
    # A backstop for special-purpose ranges the tables above do not name.
    return None if ip.is_global else AddressKind.RESERVED


def refusal_message(host: str, address: str, kind: AddressKind) -> str:
    """The error text of a refused connection: the address, why, and what to change."""
    target = "" if _is_literal(host) else f" for {host}"
    if kind is AddressKind.METADATA:
        return (
            f"refused to connect to {address} ({kind} address){target}; cloud metadata "
            f"endpoints are never allowed"
        )
    return (
        f"refused to connect to {address} ({kind} address){target}; set allow_private = "
        f"true in the connector to allow it"
    )


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of ``host`` from the system resolver (``getaddrinfo``), in the
    order the system prefers, without duplicates.

    The one place the guard learns addresses: tests replace it (``monkeypatch`` on this
    module, or the ``resolver`` argument of :class:`GuardedBackend`).
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to allowed addresses.

    ``connect_tcp`` resolves the host through ``resolver`` (default:
    :func:`resolve_host`, looked up at each call), refuses the whole connection with
    :class:`~notice_relay.errors.AddressRefused` if any of its addresses is not
    allowed, and otherwise connects to the checked addresses in order, as IP literals,
    through ``backend`` (default: httpcore's own).

    Any refused address refuses the host, rather than skipping to the allowed ones: a
    public name with a private record is a misconfiguration or an attack, and an
    error that says so beats deliveries that work or fail by the resolver's order.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver | None = None,
        backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.allow_private = allow_private
        self._resolver = resolver
        self._backend = backend or httpcore.AnyIOBackend()

    async def checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of ``host`` that a connection may use; raises
        :class:`~notice_relay.errors.AddressRefused` when any is not allowed, and
        httpcore's ``ConnectError`` when the name does not resolve."""
        addresses = [_parse(host)] if _is_literal(host) else await self._resolve(host, port)
        for address in addresses:
            kind = classify_address(address)
            if kind is None or (self.allow_private and kind is not AddressKind.METADATA):
                continue
            shown = _display(address)
            raise AddressRefused(
                refusal_message(host, shown, kind), host=host, address=shown, kind=kind.value
            )
        return addresses

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        # Looked up at call time, so that replacing the module's resolve_host reaches
        # backends that already exist.
        resolver = self._resolver or resolve_host
        try:
            raw = await resolver(host, port)
            addresses = [_parse(value) for value in raw]
        except (OSError, ValueError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}: no addresses")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first reachable checked address of ``host``, as an IP literal:
        the wrapped backend never resolves the name again."""
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.checked_addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out resolving {host}") from None
        for number, address in enumerate(addresses, start=1):
            try:
                return await self._backend.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                if number == len(addresses):
                    raise  # the next address might have answered; the last one reports
        raise AssertionError("unreachable: addresses is never empty")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Refused: channels only ever connect over TCP."""
        raise PermanentChannelError(f"refused to connect to the Unix socket {path}")

    async def sleep(self, seconds: float) -> None:
        """Delegated to the wrapped backend."""
        await self._backend.sleep(seconds)


def _parse(value: str) -> IPAddress:
    return ipaddress.ip_address(value)


def _display(address: IPAddress) -> str:
    # Python before 3.13 prints ::ffff:10.0.0.1 as ::ffff:a00:1; the dotted form is
    # the one an operator recognises.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def guarded_transport(
    *,
    allow_private: bool,
    limits: httpx.Limits | None = None,
    verify: ssl.SSLContext | bool = True,
    resolver: Resolver | None = None,
    backend: httpcore.AsyncNetworkBackend | None = None,
) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection goes through a :class:`GuardedBackend`.

    No proxy and no settings from the environment (a proxy would be the address
    checked, not the receiver). httpx 0.28 has no public parameter for the network
    backend (encode/httpx PR 3749 proposes one), so it is set on the transport's
    connection pool, which hands it to every connection it creates; a change in
    httpx's internals fails here, loudly, rather than leaving connections unguarded.
    """
    transport = httpx.AsyncHTTPTransport(
        verify=verify,
        limits=limits or httpx.Limits(),
        trust_env=False,
        retries=0,
    )
    pool = transport._pool
    if type(pool) is not httpcore.AsyncConnectionPool or not isinstance(
        getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend
    ):
        raise RuntimeError(
            "cannot install the address guard: httpx's transport no longer holds an "
            "httpcore.AsyncConnectionPool with a _network_backend"
        )
    pool._network_backend = GuardedBackend(
        allow_private=allow_private, resolver=resolver, backend=backend
    )
    return transport


class GuardedConnector(aiohttp.TCPConnector):
    """An aiohttp connector that connects only to allowed addresses: the aiohttp
    counterpart of :class:`GuardedBackend`, for the webhook channel's aiohttp clients
    (``NOTICE_RELAY_HTTP_CLIENT=aiohttp`` or ``httpx-aiohttp``).

    aiohttp turns a URL's host into addresses in ``_resolve_host`` and then connects
    to exactly the addresses it returned (``_create_direct_connection`` builds its
    socket addresses from them). This connector replaces that step with the guard's
    own: every address of the host, IP literals included, is resolved through
    :func:`resolve_host` (or ``resolver``) and checked, and the checked IP literals are
    what aiohttp connects to; it never resolves the name itself. The DNS cache is off,
    so every new connection is checked again, as with httpcore. The URL's host name
    still drives SNI, certificate verification and the ``Host`` header.

    aiohttp has no public hook for this; ``_resolve_host`` is checked to exist at
    construction, so a change in aiohttp's internals fails loudly rather than leaving
    connections unguarded.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver | None = None,
        limit: int = 100,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        if "_resolve_host" not in vars(aiohttp.TCPConnector):
            raise RuntimeError(
                "cannot install the address guard: aiohttp.TCPConnector no longer has "
                "_resolve_host"
            )
        super().__init__(
            limit=limit,
            limit_per_host=0,
            keepalive_timeout=keepalive_timeout,
            use_dns_cache=False,
            ssl=ssl_context,
        )
        self._guard = GuardedBackend(allow_private=allow_private, resolver=resolver)

    @property
    def allow_private(self) -> bool:
        """Whether private addresses (never metadata endpoints) may be connected to."""
        return self._guard.allow_private

    async def _resolve_host(  # type: ignore[override]
        self, host: str, port: int, traces: object = None
    ) -> list[dict[str, object]]:
        """The checked addresses of ``host``, as aiohttp's resolve results."""
        bare = host.rstrip(".") if not _is_literal(host) else host
        try:
            addresses = await self._guard.checked_addresses(bare, port)
        except httpcore.ConnectError as exc:
            raise TransientChannelError(f"connection failed: {exc}") from None
        return [
            {
                "hostname": host,
                "host": str(address),
                "port": port,
                "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                "proto": socket.IPPROTO_TCP,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]


def guarded_connector(
    *,
    allow_private: bool,
    limit: int = 100,
    keepalive_timeout: float = 30.0,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | bool = True,
) -> GuardedConnector:
    """An aiohttp connector whose every connection goes through the address guard.

    Must be created inside a running event loop (aiohttp binds connectors to it).
    """
    return GuardedConnector(
        allow_private=allow_private,
        resolver=resolver,
        limit=limit,
        keepalive_timeout=keepalive_timeout,
        ssl_context=ssl_context,
    )
