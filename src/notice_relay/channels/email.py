"""The email channel: notices to a developer's opt-out mailbox, through the operator's
SMTP server (aiosmtplib).

``send(tasks)`` sends one digest message for the batch it is given (several when the
batch is larger than the connector's ``max_per_digest`` or than
``NOTICE_RELAY_SMTP_MAX_MESSAGE_BYTES``); every task of a message gets that message's
outcome. Collecting tasks for a digest window is the caller's job: the channel exposes
``digest_window`` and ``max_per_digest`` for it. Rendering is pure and lives in
:mod:`notice_relay.channels.email_render`.

Every exception an attempt can raise becomes an outcome through :func:`translate_error`,
the one place where aiosmtplib errors are interpreted:

====================================================  ==========
SMTP 4xx reply (greeting, AUTH, MAIL, RCPT, DATA)     transient (421: slow_down)
SMTP 5xx reply                                        permanent
authentication refused (535)                          permanent
timeouts                                              transient (ChannelTimeout)
connection refused, reset or lost                     transient
TLS handshake or certificate failure                  transient
STARTTLS required but not offered by the server       transient
AUTH not offered / no common mechanism                permanent
all recipients refused                                permanent if every reply is 5xx,
                                                      else transient
some recipients refused                               delivered; the refused ones are
                                                      named in the receipt
====================================================  ==========

TLS problems are transient because the SMTP server is the operator's own: an expired
certificate or a stripped STARTTLS is fixed (or stops) without touching the notice,
while a refused AUTH needs the operator to act, and is permanent like any 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiosmtplib
import structlog
from pydantic import TypeAdapter, ValidationError

from notice_relay.channels.base import outcome_from_error, sanitize_text
from notice_relay.channels.email_render import (
    POLICY,
    build_message,
    is_safe_delivery_id,
    split_digest,
)
from notice_relay.connectors import Developer, EmailAddress, EmailChannelConfig
from notice_relay.durations import parse_duration
from notice_relay.errors import (
    ChannelError,
    ChannelTimeout,
    ConfigError,
    PermanentChannelError,
    TransientChannelError,
)
from notice_relay.models import DeliveryTask, Outcome

__all__ = ["EmailChannel", "SmtpSettings", "TlsMode", "translate_error"]

log = structlog.get_logger(__name__)

ENV_PREFIX: Final = "NOTICE_RELAY_SMTP_"
DEFAULT_TIMEOUT: Final = timedelta(seconds=30)
#: Stays under Postfix's default ``message_size_limit`` (10,240,000 bytes).
DEFAULT_MAX_MESSAGE_BYTES: Final = 8_000_000
#: How long a finished session may take to close its socket (the TLS shutdown).
CLOSE_GRACE: Final = 2.0
_DEFAULT_PORTS: Final = {"starttls": 587, "tls": 465, "none": 25}
_ADDRESS: Final = TypeAdapter(EmailAddress)
# "Name <local@domain>" or a bare "local@domain".
_FROM = re.compile(r"\s*(?:(?P<name>[^<>]*?)\s*<(?P<addr>[^<>\s]+)>|(?P<bare>[^<>\s]+))\s*")
_HOST = re.compile(r"[A-Za-z0-9.:_-]{1,253}")


class TlsMode(StrEnum):
    """How the connection to the SMTP server is protected."""

    STARTTLS = "starttls"  # plain connect, then STARTTLS; refuse to go on without it
    TLS = "tls"            # implicit TLS from the first byte (SMTPS, port 465)
    NONE = "none"          # no TLS (a local relay); AUTH is then refused


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """The operator's SMTP server: where mail goes out, as whom, and how securely.

    Read with :meth:`from_env` from ``NOTICE_RELAY_SMTP_*``. The password is never part
    of ``repr`` or of any error message.
    """

    host: str
    from_address: str
    port: int | None = None
    tls: TlsMode = TlsMode.STARTTLS
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: timedelta = DEFAULT_TIMEOUT
    helo_name: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if not _HOST.fullmatch(self.host):
            raise ConfigError(f"{ENV_PREFIX}HOST: {self.host[:60]!r} is not a host name")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ConfigError(f"{ENV_PREFIX}PORT: must be 1-65535, not {self.port}")
        if self.helo_name is not None and not _HOST.fullmatch(self.helo_name):
            raise ConfigError(f"{ENV_PREFIX}HELO_NAME: {self.helo_name[:60]!r} is not a host name")
        if not timedelta(0) < self.timeout <= timedelta(minutes=5):
            raise ConfigError(f"{ENV_PREFIX}TIMEOUT: must be longer than 0 and at most 5m")
        if self.max_message_bytes < 64 * 1024:
            raise ConfigError(f"{ENV_PREFIX}MAX_MESSAGE_BYTES: must be at least 65536")
        if (self.username is None) != (self.password is None):
            raise ConfigError(
                f"{ENV_PREFIX}USERNAME and a password ({ENV_PREFIX}PASSWORD or "
                f"{ENV_PREFIX}PASSWORD_FILE) go together: set both or neither"
            )
        if self.username is not None and self.tls is TlsMode.NONE:
            raise ConfigError(
                f"{ENV_PREFIX}TLS=none with {ENV_PREFIX}USERNAME would send the password "
                "in clear text; use starttls or tls"
            )
        _parse_from(self.from_address)  # fails now, at start-up, not per message

    @property
    def effective_port(self) -> int:
        """The configured port, or the usual one for the TLS mode (587, 465, 25)."""
        return self.port if self.port is not None else _DEFAULT_PORTS[self.tls.value]

    @property
    def sender(self) -> Address:
        """The From address (display name and addr-spec), validated."""
        return _parse_from(self.from_address)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SmtpSettings:
        """Read ``NOTICE_RELAY_SMTP_{HOST, PORT, TLS, USERNAME, PASSWORD, PASSWORD_FILE,
        FROM, CA_FILE, TIMEOUT, HELO_NAME, MAX_MESSAGE_BYTES}``; HOST and FROM are
        required. Raises :class:`~notice_relay.errors.ConfigError` naming the variable."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name, "").strip()
            return value or None

        def required(name: str) -> str:
            value = get(name)
            if value is None:
                raise ConfigError(f"{ENV_PREFIX}{name} is not set (needed to send email)")
            return value

        def integer(name: str) -> int | None:
            raw = get(name)
            try:
                return None if raw is None else int(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{name} must be an integer, not {raw!r}") from None

        tls_raw = (get("TLS") or TlsMode.STARTTLS.value).lower()
        try:
            tls = TlsMode(tls_raw)
        except ValueError:
            raise ConfigError(
                f"{ENV_PREFIX}TLS must be starttls, tls or none, not {tls_raw[:20]!r}"
            ) from None
        timeout_raw = get("TIMEOUT")
        try:
            timeout = parse_duration(timeout_raw) if timeout_raw else DEFAULT_TIMEOUT
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}TIMEOUT: {exc}") from None
        ca_file = get("CA_FILE")
        return cls(
            host=required("HOST"),
            from_address=required("FROM"),
            port=integer("PORT"),
            tls=tls,
            username=get("USERNAME"),
            password=_read_password(env),
            ca_file=Path(ca_file) if ca_file else None,
            timeout=timeout,
            helo_name=get("HELO_NAME"),
            max_message_bytes=integer("MAX_MESSAGE_BYTES") or DEFAULT_MAX_MESSAGE_BYTES,
        )

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context (``None`` for ``tls=none``): certificates and host
        names verified, against ``ca_file`` alone when set (it replaces the system
        store), TLS 1.2 at least."""
        if self.tls is TlsMode.NONE:
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(
                f"{ENV_PREFIX}CA_FILE: cannot load {self.ca_file}: {reason}"
            ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def _parse_from(value: str) -> Address:
    match = _FROM.fullmatch(value)
    addr = (match.group("addr") or match.group("bare")) if match else None
    name = (match.group("name") or "") if match else ""
    problem = ConfigError(
        f"{ENV_PREFIX}FROM: {value[:100]!r} is not an address "
        '("local@domain.tld" or "Name <local@domain.tld>")'
    )
    if not addr or any(ord(ch) < 32 or ord(ch) == 127 or ch == '"' for ch in name):
        raise problem
    try:
        _ADDRESS.validate_python(addr)
        return Address(display_name=name, addr_spec=addr)
    except (ValueError, ValidationError):
        raise problem from None


def _read_password(env: Mapping[str, str]) -> str | None:
    inline = env.get(ENV_PREFIX + "PASSWORD") or None
    path = (env.get(ENV_PREFIX + "PASSWORD_FILE") or "").strip() or None
    if inline is not None and path is not None:
        raise ConfigError(f"give {ENV_PREFIX}PASSWORD or {ENV_PREFIX}PASSWORD_FILE, not both")
    if path is None:
        return inline
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{ENV_PREFIX}PASSWORD_FILE: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{ENV_PREFIX}PASSWORD_FILE: cannot read {path}: {reason}") from None
    password = raw.rstrip("\r\n")
    if not password:
        raise ConfigError(f"{ENV_PREFIX}PASSWORD_FILE: {path} is empty")
    return password


# ------------------------------------------------------------------------- translation


def _reply(code: int, message: str) -> str:
    return sanitize_text(f"{code} {message}", 300)


def _by_code(code: int, text: str) -> ChannelError:
    if 500 <= code < 600:
        return PermanentChannelError(text, status_code=code)
    # 4xx, and anything malformed (aiosmtplib reports -1): a later attempt may succeed.
    error = TransientChannelError(text, status_code=code if code > 0 else None)
    # 421: the server is closing the connection ("too busy"): back off longer.
    error.slow_down = code == 421
    return error


_PHASES: Final[tuple[tuple[type[aiosmtplib.SMTPResponseException], str], ...]] = (
    (aiosmtplib.SMTPConnectResponseError, "the server refused the connection"),
    (aiosmtplib.SMTPHeloError, "EHLO refused"),
    (aiosmtplib.SMTPAuthenticationError, "authentication failed"),
    (aiosmtplib.SMTPSenderRefused, "sender refused"),
    (aiosmtplib.SMTPRecipientRefused, "recipient refused"),
    (aiosmtplib.SMTPDataError, "message refused"),
)


def _describe(exc: BaseException) -> str:
    return sanitize_text(str(exc) or type(exc).__name__, 300)


def translate_error(exc: BaseException, timeout: float) -> ChannelError:
    """Turn any exception of an SMTP attempt into a
    :class:`~notice_relay.errors.ChannelError` whose class says whether to retry (see
    the module docstring). Anything unexpected is logged and treated as transient, so a
    bug costs a few bounded retries instead of stopping other deliveries."""
    if isinstance(exc, ChannelError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = "; ".join(
            f"{sanitize_text(r.recipient, 100)} ({_reply(r.code, r.message)})"
            for r in exc.recipients
        )
        codes = [r.code for r in exc.recipients]
        transient = [c for c in codes if not 500 <= c < 600]
        return _by_code(transient[0] if transient else codes[0] if codes else -1,
                        f"all recipients refused: {refused}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        phase = next((name for cls, name in _PHASES if isinstance(exc, cls)), "the server replied")
        return _by_code(exc.code, f"{phase}: {_reply(exc.code, exc.message)}")
    if isinstance(exc, TimeoutError):  # aiosmtplib's timeouts, and asyncio's
        while_ = " while connecting" if isinstance(exc, aiosmtplib.SMTPConnectError) else ""
        return ChannelTimeout(f"timed out after {timeout:g}s{while_}")
    cause = exc.__cause__ if isinstance(exc, aiosmtplib.SMTPConnectError) else exc
    if isinstance(cause, ssl.SSLError):  # implicit TLS wraps it; STARTTLS raises it raw
        return TransientChannelError(f"TLS handshake failed: {_describe(cause)}")
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return TransientChannelError(f"connection failed: {_describe(exc)}")
    if isinstance(exc, OSError):  # SMTPServerDisconnected, resets, unreachable networks
        return TransientChannelError(f"connection lost: {_describe(exc)}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return PermanentChannelError(f"not supported by the SMTP server: {_describe(exc)}")
    if isinstance(exc, aiosmtplib.SMTPException):
        text = _describe(exc)
        # aiosmtplib says only in words which capability is missing. A missing STARTTLS
        # may be a downgrade attack that stops; a missing AUTH needs the operator.
        if "STARTTLS" in text:
            return TransientChannelError(f"refusing to send without TLS: {text}")
        return PermanentChannelError(f"SMTP error: {text}")
    log.error("channel.unexpected_error", channel_type="email", exc_info=exc)
    return TransientChannelError(f"internal error: {type(exc).__name__}: {_describe(exc)}")


# ----------------------------------------------------------------------------- channel


class _SMTP(aiosmtplib.SMTP):
    """aiosmtplib's client, remembering every transport it closes (also those it
    closes itself when connecting fails), so that the session can wait for them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.closed_transports: list[asyncio.BaseTransport] = []

    def close(self) -> None:
        """Close the connection, remembering its transport."""
        if self.transport is not None:
            self.closed_transports.append(self.transport)
        super().close()


class _Connection:
    """One send's SMTP session: connected on first use, reconnected after the server
    dropped it, never retried within the send once connecting failed."""

    def __init__(self, channel: EmailChannel) -> None:
        self._channel = channel
        self._smtp: _SMTP | None = None
        self._clients: list[_SMTP] = []
        self._failure: ChannelError | None = None

    async def ready(self) -> aiosmtplib.SMTP:
        if self._failure is not None:
            raise self._failure
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        self.abort()
        smtp = self._channel._client()
        self._clients.append(smtp)
        try:
            await smtp.connect()
        except Exception as exc:
            self._failure = translate_error(exc, self._channel._timeout)
            raise self._failure from None
        self._smtp = smtp
        return smtp

    async def close(self) -> None:
        """QUIT, then wait until every socket of the session is really closed: over
        TLS, closing only starts the TLS shutdown, and a socket still open when the
        event loop ends leaks."""
        if self._smtp is not None and self._smtp.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await self._smtp.quit()
        self.abort()
        for client in self._clients:
            for transport in client.closed_transports:
                await _wait_closed(transport, CLOSE_GRACE)

    def abort(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None


async def _wait_closed(transport: asyncio.BaseTransport, grace: float) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:  # already closed
        return
    try:
        async with asyncio.timeout(grace):
            # Polled: neither asyncio's TLS transport nor aiosmtplib has a public
            # "closed" event, and the socket closes only once the TLS shutdown is done.
            while sock.fileno() != -1:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    except TimeoutError:  # the server never answered the TLS close_notify
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        await asyncio.sleep(0)


class EmailChannel:
    """Delivers notices to one developer's mailbox(es) as digest messages.

    Each :meth:`send` opens one SMTP session (STARTTLS or implicit TLS, AUTH when a
    username is set), sends its messages one after the other, and quits.
    """

    def __init__(
        self, developer: Developer, config: EmailChannelConfig, smtp: SmtpSettings
    ) -> None:
        self.name = config.name
        self.developer_id = developer.id
        self.developer_name = developer.name
        self.config = config
        self.smtp = smtp
        #: How long the caller collects tasks before calling :meth:`send` (0 = at once).
        self.digest_window: timedelta = config.digest
        #: The most notices one message carries; a larger batch is split.
        self.max_per_digest: int = config.max_per_digest
        self._sender = smtp.sender
        self._domain = self._sender.domain or "notice-relay"
        self._timeout = smtp.timeout.total_seconds()
        # Built now, so that an unreadable CA file fails at start-up, not per attempt.
        self._tls = smtp.tls_context()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _client(self) -> _SMTP:
        s = self.smtp
        kwargs: dict[str, Any] = {}
        if s.helo_name:
            kwargs["local_hostname"] = s.helo_name
        return _SMTP(
            hostname=s.host,
            port=s.effective_port,
            username=s.username,
            password=s.password,
            timeout=self._timeout,
            use_tls=s.tls is TlsMode.TLS,
            # True, not None: without STARTTLS aiosmtplib would go on in clear text.
            start_tls=s.tls is TlsMode.STARTTLS,
            tls_context=self._tls,
            **kwargs,
        )

    async def send(self, tasks: Sequence[DeliveryTask]) -> list[Outcome]:
        """Send ``tasks`` as digest messages; one outcome per task, in order.

        Raises :class:`RuntimeError` if the channel is closed and :class:`ValueError`
        if a task belongs to another developer or channel (a routing bug); never
        because an attempt failed.
        """
        if self._closed:
            raise RuntimeError(f"email channel {self.name!r} is closed")
        for task in tasks:
            if task.developer_id != self.developer_id or task.channel != self.name:
                raise ValueError(
                    f"task {task.delivery_id} is for {task.developer_id}/{task.channel}, "
                    f"not {self.developer_id}/{self.name}"
                )
        # A malformed delivery id (a bug upstream: fan-out makes "dlv_" + hex) fails its
        # own task only; it must not take a digest of other notices down with it.
        outcomes: list[Outcome | None] = [
            None if is_safe_delivery_id(t.delivery_id)
            else Outcome.permanent(t, "cannot build the message: unsafe delivery id")
            for t in tasks
        ]
        pending = [index for index, outcome in enumerate(outcomes) if outcome is None]
        groups = split_digest(
            [tasks[index] for index in pending],
            max_count=self.max_per_digest,
            max_bytes=self.smtp.max_message_bytes,
        )
        slots = iter(pending)
        connection = _Connection(self)
        try:
            for group in groups:
                for outcome in await self._send_one(connection, group):
                    outcomes[next(slots)] = outcome
        except BaseException:
            connection.abort()  # cancelled: no polite QUIT
            raise
        await connection.close()
        return [outcome for outcome in outcomes if outcome is not None]

    async def _send_one(
        self, connection: _Connection, tasks: Sequence[DeliveryTask]
    ) -> list[Outcome]:
        attempted_at = datetime.now(UTC)
        started = time.perf_counter()
        try:
            try:
                message = build_message(
                    tasks, developer_name=self.developer_name, sender=self._sender,
                    recipients=self.config.to, date=attempted_at, domain=self._domain,
                )
                data = message.as_bytes(policy=POLICY)
            except (ValueError, TypeError) as exc:  # the same input fails every time
                raise PermanentChannelError(f"cannot build the message: {exc}") from None
            smtp = await connection.ready()
            refused, reply = await smtp.sendmail(
                self._sender.addr_spec, list(self.config.to), data
            )
        except Exception as exc:  # every failure, whatever its type, becomes an outcome
            error = translate_error(exc, self._timeout)
            latency = _elapsed_ms(started)
            return [
                outcome_from_error(t, error, attempted_at=attempted_at, latency_ms=latency)
                for t in tasks
            ]
        receipt = f"250 {sanitize_text(reply, 200)}; Message-ID {message['Message-ID']}"
        if refused:
            receipt += "; refused: " + "; ".join(
                f"{sanitize_text(addr, 100)} ({_reply(r.code, r.message)})"
                for addr, r in refused.items()
            )
        latency = _elapsed_ms(started)
        return [
            Outcome.delivered(t, receipt=receipt, status_code=250, attempted_at=attempted_at,
                              latency_ms=latency)
            for t in tasks
        ]

    async def aclose(self) -> None:
        """Mark the channel closed (each send closes its own SMTP session). Idempotent."""
        self._closed = True


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
