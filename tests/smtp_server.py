"""A real SMTP server for tests: aiosmtpd on 127.0.0.1 (a free port), its certificate
issued by a test CA (trustme), AUTH required with a fixed username and password.

Load this module as a plugin in a test module (tests/ has no package; pytest puts it
on ``sys.path``), which makes its fixtures available without importing them by name
(an imported fixture would be shadowed by the test's parameter of the same name)::

    from typing import TYPE_CHECKING

    if TYPE_CHECKING:
        from smtp_server import SmtpServer

    pytest_plugins = ["smtp_server"]

Import nothing from it at run time in such a module: a module imported before pytest
registers it as a plugin cannot have its asserts rewritten (pytest refuses that).

    async def test_x(smtp_server: SmtpServer) -> None:
        channel = EmailChannel(developer, config, smtp_server.settings())
        ...
        [message] = smtp_server.messages          # bytes + envelope, as received

Fixtures: ``smtp_server`` (STARTTLS required, then AUTH), ``smtps_server`` (implicit
TLS, then AUTH), ``plain_smtp_server`` (no TLS, no AUTH: a local relay),
``smtp_ca_file`` (the CA certificate, PEM). Each server lives for one
test; the CA lives for the whole run. For a worker started as a process, pass
``smtp_server.environ()`` (the ``NOTICE_RELAY_SMTP_*`` variables) in its environment.

The server can be scripted: ``fail_next("451 4.3.0 try again later", times=2)``
answers the next two DATA commands with that reply (nothing is stored), and
``refuse_recipient("x@y.example", "550 5.1.1 mailbox unavailable")`` refuses RCPT for
an address.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import functools
import itertools
import logging
import ssl
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from notice_relay.channels.email import SmtpSettings, TlsMode

__all__ = [
    "TEST_FROM",
    "TEST_PASSWORD",
    "TEST_USERNAME",
    "ReceivedMessage",
    "SmtpHandler",
    "SmtpServer",
    "plain_smtp_server",
    "run_smtp_server",
    "smtp_ca_file",
    "smtp_server",
    "smtps_server",
]

TEST_USERNAME = "relay-test"
TEST_PASSWORD = "correct horse battery staple"
TEST_FROM = "notice-relay <relay@relay.example.invalid>"
_HOST = "127.0.0.1"


class _DropLoginDataWarning(logging.Filter):
    # aiosmtpd 1.4 logs a deprecation warning of its own API on every successful AUTH.
    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_DropLoginDataWarning())


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server stored it: the raw DATA bytes and the envelope."""

    data: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]
    authenticated_as: str | None
    tls: bool

    def parsed(self) -> EmailMessage:
        """The message parsed back (``email.policy.default``)."""
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        return message


class SmtpHandler:
    """aiosmtpd handler: stores every accepted message; answers scripted replies first.

    Runs in the server's thread; everything shared with the test is under a lock.
    """

    def __init__(self, *, require_auth: bool) -> None:
        self.require_auth = require_auth
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._data_replies: deque[str] = deque()
        self._rcpt_replies: dict[str, str] = {}
        self._queue_ids = itertools.count(1)
        self.data_commands = 0

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every message accepted so far, in order."""
        with self._lock:
            return list(self._messages)

    def fail_next(self, reply: str, times: int = 1) -> None:
        """Answer the next ``times`` DATA commands with ``reply`` (e.g. ``451 4.3.0 …``)."""
        with self._lock:
            self._data_replies.extend([reply] * times)

    def refuse_recipient(self, address: str, reply: str) -> None:
        """Answer RCPT TO:<address> with ``reply`` (e.g. ``550 5.1.1 …``)."""
        with self._lock:
            self._rcpt_replies[address.lower()] = reply

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        """Refuse unauthenticated senders (implicit TLS has no built-in check)."""
        if self.require_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept every recipient except the scripted ones."""
        with self._lock:
            reply = self._rcpt_replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        """Store the message, or answer the next scripted reply instead."""
        with self._lock:
            self.data_commands += 1
            if self._data_replies:
                return self._data_replies.popleft()
            content = envelope.original_content or b""
            login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) \
                else None
            self._messages.append(ReceivedMessage(
                data=bytes(content),
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                authenticated_as=login.decode() if login else None,
                # session.ssl is set by STARTTLS only; the transport knows both kinds.
                tls=server.transport is not None
                and server.transport.get_extra_info("ssl_object") is not None,
            ))
            return f"250 2.0.0 Ok: queued as Q{next(self._queue_ids):06d}"


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == TEST_USERNAME.encode()
        and auth_data.password == TEST_PASSWORD.encode()
    )
    # handled=False: aiosmtpd then answers a failure itself (535).
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


class _Controller(Controller):
    """A threaded aiosmtpd controller that may bind port 0: the port the system chose is
    read back before the controller connects to its own server."""

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@dataclass
class SmtpServer:
    """A running test SMTP server, and how to reach it."""

    host: str
    port: int
    tls: Literal["starttls", "tls", "none"]
    ca_file: Path
    handler: SmtpHandler
    username: str = TEST_USERNAME
    password: str = field(default=TEST_PASSWORD, repr=False)
    from_address: str = TEST_FROM

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every message the server accepted, in order."""
        return self.handler.messages

    def fail_next(self, reply: str, times: int = 1) -> None:
        """See :meth:`SmtpHandler.fail_next`."""
        self.handler.fail_next(reply, times)

    def refuse_recipient(self, address: str, reply: str) -> None:
        """See :meth:`SmtpHandler.refuse_recipient`."""
        self.handler.refuse_recipient(address, reply)

    def settings(self, **overrides: Any) -> SmtpSettings:
        """Client settings for this server (its CA; its credentials unless it speaks
        plain text), with overrides."""
        plain = self.tls == "none"
        settings = SmtpSettings(
            host=self.host, port=self.port, tls=TlsMode(self.tls),
            from_address=self.from_address,
            username=None if plain else self.username,
            password=None if plain else self.password,
            ca_file=self.ca_file, helo_name="relay.example.invalid",
        )
        return replace(settings, **overrides)

    def environ(self) -> dict[str, str]:
        """The ``NOTICE_RELAY_SMTP_*`` variables a worker process needs for this server."""
        env = {
            "NOTICE_RELAY_SMTP_HOST": self.host,
            "NOTICE_RELAY_SMTP_PORT": str(self.port),
            "NOTICE_RELAY_SMTP_TLS": self.tls,
            "NOTICE_RELAY_SMTP_FROM": self.from_address,
            "NOTICE_RELAY_SMTP_CA_FILE": str(self.ca_file),
            "NOTICE_RELAY_SMTP_HELO_NAME": "relay.example.invalid",
        }
        if self.tls != "none":
            env["NOTICE_RELAY_SMTP_USERNAME"] = self.username
            env["NOTICE_RELAY_SMTP_PASSWORD"] = self.password
        return env


@functools.cache
def _ca() -> trustme.CA:
    return trustme.CA()


@functools.cache
def _server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _ca().issue_cert(_HOST, "localhost").configure_cert(context)
    return context


def _ca_path(factory: pytest.TempPathFactory) -> Path:
    path = factory.getbasetemp() / "smtp-test-ca.pem"
    if not path.exists():
        _ca().cert_pem.write_to_path(str(path))
    return path


@contextmanager
def run_smtp_server(
    ca_file: Path,
    *,
    tls: Literal["starttls", "tls", "none"] = "starttls",
    require_auth: bool = True,
) -> Iterator[SmtpServer]:
    """Run a server until the block ends. ``starttls``: STARTTLS required before
    anything else, AUTH after it; ``tls``: implicit TLS; ``none``: plain text, and
    then no AUTH either (``require_auth`` must be false)."""
    handler = SmtpHandler(require_auth=require_auth)
    kwargs: dict[str, Any] = {
        "hostname": _HOST,
        "port": 0,
        "server_hostname": "smtp.test.invalid",
        "ready_timeout": 10.0,
        "authenticator": _authenticate,
    }
    if tls == "starttls":
        kwargs.update(tls_context=_server_context(), require_starttls=True,
                      auth_required=require_auth, auth_require_tls=True)
    elif tls == "tls":
        # aiosmtpd's own AUTH checks only know STARTTLS; on implicit TLS the handler
        # requires AUTH itself (handle_MAIL).
        kwargs.update(ssl_context=_server_context(), auth_require_tls=False)
    elif require_auth:
        raise ValueError("a plain-text test server cannot require AUTH")
    controller = _Controller(handler, **kwargs)
    controller.start()
    try:
        yield SmtpServer(_HOST, controller.port, tls, ca_file, handler)
    finally:
        controller.stop()


@pytest.fixture
def smtp_ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test CA's certificate (PEM): the servers' certificates verify against it."""
    return _ca_path(tmp_path_factory)


@pytest.fixture
def smtp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpServer]:
    """An SMTP server on 127.0.0.1 that requires STARTTLS, then AUTH, for one test."""
    with run_smtp_server(_ca_path(tmp_path_factory), tls="starttls") as server:
        yield server


@pytest.fixture
def smtps_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpServer]:
    """An SMTP server on 127.0.0.1 speaking implicit TLS (SMTPS), AUTH required."""
    with run_smtp_server(_ca_path(tmp_path_factory), tls="tls") as server:
        yield server


@pytest.fixture
def plain_smtp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmtpServer]:
    """An SMTP server on 127.0.0.1 without TLS or AUTH (a local relay), for one test."""
    with run_smtp_server(_ca_path(tmp_path_factory), tls="none", require_auth=False) as server:
        yield server
