"""The SSRF guard's address rules, as pure functions: nothing is resolved or contacted."""

from __future__ import annotations

import ipaddress

import httpcore
import httpx
import pytest

from notice_relay.netguard import (
    METADATA_ADDRESSES,
    AddressKind,
    GuardedBackend,
    classify_address,
    guarded_transport,
    refusal_message,
)

REFUSED = [
    # private
    ("10.0.0.1", AddressKind.PRIVATE),
    ("10.255.255.255", AddressKind.PRIVATE),
    ("172.16.0.1", AddressKind.PRIVATE),
    ("172.31.255.254", AddressKind.PRIVATE),
    ("192.168.1.1", AddressKind.PRIVATE),
    ("fc00::1", AddressKind.PRIVATE),
    ("fd12:3456:789a::1", AddressKind.PRIVATE),
    ("fec0::1", AddressKind.PRIVATE),
    # loopback
    ("127.0.0.1", AddressKind.LOOPBACK),
    ("127.255.0.9", AddressKind.LOOPBACK),
    ("::1", AddressKind.LOOPBACK),
    # link-local
    ("169.254.0.1", AddressKind.LINK_LOCAL),
    ("fe80::1", AddressKind.LINK_LOCAL),
    ("fe80::1%eth0", AddressKind.LINK_LOCAL),
    # carrier-grade NAT
    ("100.64.0.1", AddressKind.CGNAT),
    ("100.127.255.254", AddressKind.CGNAT),
    # unspecified, reserved, multicast
    ("0.0.0.0", AddressKind.UNSPECIFIED),
    ("::", AddressKind.UNSPECIFIED),
    ("0.1.2.3", AddressKind.RESERVED),
    ("240.0.0.1", AddressKind.RESERVED),
    ("255.255.255.255", AddressKind.RESERVED),
    ("192.0.2.10", AddressKind.RESERVED),
    ("198.18.0.1", AddressKind.RESERVED),
    ("2001:db8::1", AddressKind.RESERVED),
    ("::10.0.0.1", AddressKind.RESERVED),
    ("100::1", AddressKind.RESERVED),
    ("224.0.0.1", AddressKind.MULTICAST),
    ("239.255.255.250", AddressKind.MULTICAST),
    ("ff02::1", AddressKind.MULTICAST),
    # cloud metadata (before link-local / private: the clearer reason)
    ("169.254.169.254", AddressKind.METADATA),
    ("169.254.170.2", AddressKind.METADATA),
    ("fd00:ec2::254", AddressKind.METADATA),
    ("100.100.100.200", AddressKind.METADATA),
    ("168.63.129.16", AddressKind.METADATA),
    # IPv4 reached through IPv6: judged by the IPv4 address
    ("::ffff:10.0.0.1", AddressKind.PRIVATE),
    ("::ffff:127.0.0.1", AddressKind.LOOPBACK),
    ("::ffff:169.254.169.254", AddressKind.METADATA),
    ("::ffff:100.64.1.1", AddressKind.CGNAT),
    ("64:ff9b::a00:1", AddressKind.PRIVATE),  # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", AddressKind.LOOPBACK),  # NAT64 of 127.0.0.1
    ("2002:a9fe:a9fe::", AddressKind.METADATA),  # 6to4 of 169.254.169.254
    ("2002:c0a8:101::1", AddressKind.PRIVATE),  # 6to4 of 192.168.1.1
]

PUBLIC = [
    "93.184.216.34",
    "1.1.1.1",
    "8.8.8.8",
    "172.32.0.1",  # just outside 172.16/12
    "100.128.0.1",  # just outside 100.64/10
    "169.255.0.1",  # just outside 169.254/16
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:93.184.216.34",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize(("address", "kind"), REFUSED)
def test_non_public_addresses_are_classified(address: str, kind: AddressKind) -> None:
    """Every private, loopback, link-local, CGNAT, reserved, multicast, unspecified and
    metadata range of the brief is named, IPv4 in IPv6 by the IPv4 address it reaches."""
    assert classify_address(address) is kind
    assert classify_address(ipaddress.ip_address(address)) is kind


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    """Globally routable addresses, including ones next to refused ranges, are public."""
    assert classify_address(address) is None


def test_every_metadata_address_is_classified_as_metadata() -> None:
    """The metadata list and the classifier agree."""
    assert {classify_address(a) for a in METADATA_ADDRESSES} == {AddressKind.METADATA}


def test_not_an_address_is_a_value_error() -> None:
    """A host name is not classified: resolving it is the backend's job."""
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        classify_address("hooks.example.invalid")


def test_refusal_messages_name_the_address_the_host_and_the_fix() -> None:
    """The error says which address, why, for which host, and what setting allows it;
    metadata is never allowed, and an IP literal host is not repeated."""
    assert refusal_message("hooks.example.invalid", "10.0.0.1", AddressKind.PRIVATE) == (
        "refused to connect to 10.0.0.1 (private address) for hooks.example.invalid; "
        "set allow_private = true in the connector to allow it"
    )
    assert refusal_message("10.0.0.1", "10.0.0.1", AddressKind.PRIVATE) == (
        "refused to connect to 10.0.0.1 (private address); "
        "set allow_private = true in the connector to allow it"
    )
    assert refusal_message("169.254.169.254", "169.254.169.254", AddressKind.METADATA) == (
        "refused to connect to 169.254.169.254 (cloud metadata address); "
        "cloud metadata endpoints are never allowed"
    )


def test_guarded_transport_installs_the_guard_on_its_pool() -> None:
    """The transport's connection pool hands the guard to every connection it makes,
    with the connector's allow_private."""
    for allow in (False, True):
        transport = guarded_transport(allow_private=allow, limits=httpx.Limits(max_connections=3))
        backend = transport._pool._network_backend
        assert isinstance(backend, GuardedBackend)
        assert backend.allow_private is allow
        assert isinstance(transport._pool, httpcore.AsyncConnectionPool)
        assert transport._pool._max_connections == 3
