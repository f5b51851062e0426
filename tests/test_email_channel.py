"""The email channel against a real SMTP server (aiosmtpd on 127.0.0.1, STARTTLS or
implicit TLS, AUTH), its SMTP settings, and the one place aiosmtplib errors are
translated."""

from __future__ import annotations

import asyncio
import inspect
import socket
import ssl
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosmtplib
import pytest
import trustme
from builders import make_notice, make_task

from notice_relay.channels import EmailChannel, build_channel
from notice_relay.channels.email import SmtpSettings, TlsMode, translate_error
from notice_relay.channels.email_render import DELIVERY_IDS_HEADER, NoticeBatch, message_id
from notice_relay.connectors import Developer, EmailChannelConfig
from notice_relay.errors import ChannelError, ConfigError
from notice_relay.models import ChannelType, DeliveryTask, NoticeArtist, NoticeWork, OutcomeKind

if TYPE_CHECKING:
    from smtp_server import SmtpServer

# The smtp_server, smtps_server, plain_smtp_server and smtp_ca_file fixtures (loaded as
# a plugin: importing them by name would shadow them with the tests' parameters).
pytest_plugins = ["smtp_server"]

FROM = "notice-relay <relay@relay.example.invalid>"
PASSWORD = "correct horse battery staple"

TO = "optout@acme.example.invalid"
DOMAIN = "relay.example.invalid"


def _developer(**channel: Any) -> tuple[Developer, EmailChannelConfig]:
    developer = Developer.model_validate({
        "id": "acme-ai",
        "name": "Acme AI",
        "accepts": ["train-ai"],
        "channel": [{"type": "email", "to": [TO], **channel}],
    })
    config = developer.channels[0]
    assert isinstance(config, EmailChannelConfig)
    return developer, config


def _task(**overrides: Any) -> DeliveryTask:
    return make_task(channel="email", channel_type=ChannelType.EMAIL, **overrides)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _ChannelFactory:
    def __init__(self) -> None:
        self.channels: list[EmailChannel] = []

    def __call__(self, smtp: SmtpSettings, **channel: Any) -> EmailChannel:
        developer, config = _developer(**channel)
        ch = EmailChannel(developer, config, smtp)
        self.channels.append(ch)
        return ch


@pytest.fixture
async def channel_for() -> AsyncIterator[_ChannelFactory]:
    """Build email channels; every one is closed when the test ends."""
    factory = _ChannelFactory()
    yield factory
    for ch in factory.channels:
        await ch.aclose()


# -------------------------------------------------------------------- real-server tests


async def test_starttls_auth_delivers_one_digest_for_the_batch(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """Over STARTTLS with AUTH, a batch of 3 tasks is ONE message: every task delivered,
    in order, with the server's DATA reply and the Message-ID as receipt; the message
    lists the 3 delivery ids and its attachment holds the 3 notices."""
    ch = channel_for(smtp_server.settings())
    tasks = [_task() for _ in range(3)]
    outcomes = await ch.send(tasks)
    assert [o.delivery_id for o in outcomes] == [t.delivery_id for t in tasks]
    assert {o.kind for o in outcomes} == {OutcomeKind.DELIVERED}
    mid = message_id([t.delivery_id for t in tasks], DOMAIN)
    assert outcomes[0].receipt == f"250 2.0.0 Ok: queued as Q000001; Message-ID {mid}"
    assert {o.receipt for o in outcomes} == {outcomes[0].receipt}
    assert outcomes[0].status_code == 250

    [stored] = smtp_server.messages
    assert stored.tls is True
    assert stored.authenticated_as == "relay-test"
    assert stored.mail_from == "relay@relay.example.invalid"
    assert stored.rcpt_tos == (TO,)
    msg = stored.parsed()
    assert msg["Message-ID"] == mid
    assert msg["Subject"] == "[notice-relay] 3 AI opt-out notices for Acme AI"
    assert msg[DELIVERY_IDS_HEADER].strip() == ", ".join(t.delivery_id for t in tasks)
    attachment = next(part for part in msg.iter_attachments())
    batch = NoticeBatch.model_validate_json(attachment.get_content())
    assert batch.notices == [t.notice for t in tasks]


async def test_implicit_tls_with_auth(
    smtps_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """TLS=tls speaks TLS from the first byte (SMTPS) and authenticates."""
    [outcome] = await channel_for(smtps_server.settings()).send([_task()])
    assert outcome.kind is OutcomeKind.DELIVERED
    [stored] = smtps_server.messages
    assert stored.tls is True
    assert stored.authenticated_as == "relay-test"


async def test_451_is_transient_then_the_retry_is_delivered_once(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """451 at DATA: transient with the server's reply; the retry of the same batch is
    delivered under the same Message-ID, and the server holds exactly one message."""
    ch = channel_for(smtp_server.settings())
    tasks = [_task(), _task()]
    smtp_server.fail_next("451 4.3.0 try again later")
    first = await ch.send(tasks)
    assert [o.kind for o in first] == [OutcomeKind.TRANSIENT] * 2
    assert first[0].error == "message refused: 451 4.3.0 try again later"
    assert first[0].status_code == 451
    assert smtp_server.messages == []

    retry = [t.model_copy(update={"attempt": 2}) for t in tasks]
    second = await ch.send(retry)
    assert [(o.kind, o.attempt) for o in second] == [(OutcomeKind.DELIVERED, 2)] * 2
    [stored] = smtp_server.messages
    assert stored.parsed()["Message-ID"] == message_id([t.delivery_id for t in tasks], DOMAIN)
    assert smtp_server.handler.data_commands == 2


async def test_550_is_permanent_with_the_servers_reply(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """550 at DATA is permanent, and the error quotes the reply."""
    smtp_server.fail_next("550 5.1.1 mailbox unavailable")
    [outcome] = await channel_for(smtp_server.settings()).send([_task()])
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.error == "message refused: 550 5.1.1 mailbox unavailable"
    assert outcome.status_code == 550


async def test_refused_port_is_transient_for_every_message_without_reconnecting(
    channel_for: _ChannelFactory, smtp_ca_file: Path
) -> None:
    """Nothing listening: every task of every message is transient ("connection
    failed"), quickly: a failed connect is not retried for each message."""
    settings = SmtpSettings(host="127.0.0.1", port=_closed_port(), from_address=FROM,
                            tls=TlsMode.STARTTLS, ca_file=smtp_ca_file)
    ch = channel_for(settings, max_per_digest=1)
    started = time.perf_counter()
    outcomes = await ch.send([_task() for _ in range(3)])
    assert time.perf_counter() - started < 5
    assert [o.kind for o in outcomes] == [OutcomeKind.TRANSIENT] * 3
    assert all(o.error and o.error.startswith("connection failed") for o in outcomes)


async def test_silent_server_times_out_as_transient(
    channel_for: _ChannelFactory, smtp_ca_file: Path
) -> None:
    """A server that accepts the connection but never greets gives a transient
    "timed out" after about the configured timeout."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = SmtpSettings(host="127.0.0.1", port=port, from_address=FROM,
                                ca_file=smtp_ca_file, timeout=timedelta(milliseconds=300))
        started = time.perf_counter()
        [outcome] = await channel_for(settings).send([_task()])
        elapsed = time.perf_counter() - started
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error == "timed out after 0.3s while connecting"
    assert elapsed < 3


async def test_wrong_password_is_permanent(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """AUTH refused (535) is permanent: no retry fixes the relay's credentials."""
    [outcome] = await channel_for(smtp_server.settings(password="wrong")).send([_task()])
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.status_code == 535
    assert outcome.error is not None
    assert outcome.error.startswith("authentication failed: 535")
    assert "wrong" not in outcome.error
    assert smtp_server.messages == []


async def test_untrusted_certificate_is_transient_and_sends_nothing(
    smtp_server: SmtpServer, channel_for: _ChannelFactory, tmp_path: Path
) -> None:
    """A server certificate from a CA we do not trust fails the TLS handshake:
    transient, and no message (nor password) is sent."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    [outcome] = await channel_for(smtp_server.settings(ca_file=other)).send([_task()])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith("TLS handshake failed")
    assert smtp_server.messages == []


async def test_implicit_tls_untrusted_certificate_is_transient(
    smtps_server: SmtpServer, channel_for: _ChannelFactory, tmp_path: Path
) -> None:
    """The same over implicit TLS, where the error comes from connecting."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    [outcome] = await channel_for(smtps_server.settings(ca_file=other)).send([_task()])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith("TLS handshake failed")


async def test_starttls_missing_means_nothing_is_sent_in_clear(
    plain_smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """TLS=starttls against a server that does not offer STARTTLS: transient, and the
    message is not sent over the plain connection."""
    settings = plain_smtp_server.settings(tls=TlsMode.STARTTLS)
    [outcome] = await channel_for(settings).send([_task()])
    assert outcome.kind is OutcomeKind.TRANSIENT
    assert outcome.error is not None
    assert outcome.error.startswith("refusing to send without TLS")
    assert plain_smtp_server.messages == []
    assert plain_smtp_server.handler.data_commands == 0


async def test_tls_none_for_a_local_relay(
    plain_smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """TLS=none (no username) delivers over plain SMTP to a local relay."""
    [outcome] = await channel_for(plain_smtp_server.settings()).send([_task()])
    assert outcome.kind is OutcomeKind.DELIVERED
    [stored] = plain_smtp_server.messages
    assert stored.tls is False


async def test_max_per_digest_splits_into_messages_with_their_own_outcomes(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """5 tasks with max_per_digest = 2: three messages (2, 2, 1) on one connection;
    each task's receipt names its own message's Message-ID; a failure of the second
    message fails only its two tasks."""
    ch = channel_for(smtp_server.settings(), max_per_digest=2)
    assert ch.max_per_digest == 2
    tasks = [_task() for _ in range(5)]
    outcomes = await ch.send(tasks)
    assert [o.delivery_id for o in outcomes] == [t.delivery_id for t in tasks]
    stored = smtp_server.messages
    assert len(stored) == 3
    for index, group in enumerate([tasks[0:2], tasks[2:4], tasks[4:5]]):
        mid = message_id([t.delivery_id for t in group], DOMAIN)
        msg = stored[index].parsed()
        assert msg["Message-ID"] == mid
        assert msg[DELIVERY_IDS_HEADER].strip() == ", ".join(t.delivery_id for t in group)
        for task in group:
            receipt = outcomes[tasks.index(task)].receipt
            assert receipt is not None
            assert receipt.endswith(f"Message-ID {mid}")
            assert receipt.startswith(f"250 2.0.0 Ok: queued as Q{index + 1:06d}")


async def test_a_failed_message_does_not_fail_the_next_one(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """Within one send, a 550 for the first message leaves the second delivered; and
    a 421 (the server closes) is transient and the next message reconnects."""
    ch = channel_for(smtp_server.settings(), max_per_digest=1)
    smtp_server.fail_next("550 5.7.1 content rejected")
    outcomes = await ch.send([_task(), _task()])
    assert [o.kind for o in outcomes] == [OutcomeKind.PERMANENT, OutcomeKind.DELIVERED]

    smtp_server.fail_next("421 4.3.2 service shutting down")
    outcomes = await ch.send([_task(), _task()])
    assert [o.kind for o in outcomes] == [OutcomeKind.TRANSIENT, OutcomeKind.DELIVERED]
    assert outcomes[0].status_code == 421
    assert len(smtp_server.messages) == 2


async def test_some_recipients_refused_is_delivered_and_named(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """One of two recipients refused: delivered to the other, the refused one and its
    reply named in the receipt."""
    gone = "gone@acme.example.invalid"
    smtp_server.refuse_recipient(gone, "550 5.1.1 mailbox unavailable")
    ch = channel_for(smtp_server.settings(), to=[TO, gone])
    [outcome] = await ch.send([_task()])
    assert outcome.kind is OutcomeKind.DELIVERED
    assert outcome.receipt is not None
    assert outcome.receipt.endswith(f"refused: {gone} (550 5.1.1 mailbox unavailable)")
    [stored] = smtp_server.messages
    assert stored.rcpt_tos == (TO,)


@pytest.mark.parametrize(
    ("replies", "kind"),
    [
        (("550 5.1.1 mailbox unavailable", "550 5.1.1 mailbox unavailable"),
         OutcomeKind.PERMANENT),
        (("550 5.1.1 mailbox unavailable", "450 4.2.1 mailbox busy"), OutcomeKind.TRANSIENT),
    ],
)
async def test_all_recipients_refused(
    smtp_server: SmtpServer, channel_for: _ChannelFactory, replies: tuple[str, str],
    kind: OutcomeKind,
) -> None:
    """Every recipient refused: permanent when every reply is 5xx, transient when one
    is 4xx (a retry may reach it); the error names each address and reply."""
    other = "legal@acme.example.invalid"
    smtp_server.refuse_recipient(TO, replies[0])
    smtp_server.refuse_recipient(other, replies[1])
    [outcome] = await channel_for(smtp_server.settings(), to=[TO, other]).send([_task()])
    assert outcome.kind is kind
    assert outcome.error == (
        f"all recipients refused: {TO} ({replies[0]}); {other} ({replies[1]})"
    )


async def test_hostile_notice_text_reaches_the_server_without_injecting_headers(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """Notices built directly with CR/LF, "Bcc:" and <script> in the name, an alias, a
    work title and the note: the stored message has exactly our headers and
    recipients, and no raw <script> in its HTML."""
    hostile = "X\r\nBcc: victim@elsewhere.example.invalid\r\n\r\n<script>alert(1)</script>"
    artist = NoticeArtist(artist_ref="ar_x", display_name=hostile, aliases=[hostile],
                          match_keys=["x"], profiles=[])
    notice = make_notice(artist=artist, note=hostile,
                         works=[NoticeWork(url="https://a.example.invalid/1", title=hostile)])
    [outcome] = await channel_for(smtp_server.settings()).send([_task(notice=notice)])
    assert outcome.kind is OutcomeKind.DELIVERED
    [stored] = smtp_server.messages
    assert stored.rcpt_tos == (TO,)
    msg = stored.parsed()
    assert set(msg.keys()) == {
        "From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", DELIVERY_IDS_HEADER,
        "MIME-Version", "Content-Type",
    }
    html_part = msg.get_body(("html",))
    assert html_part is not None
    html_text = html_part.get_content()
    assert "<script" not in html_text.lower()
    assert "&lt;script&gt;" in html_text


async def test_send_misuse_and_empty_batches(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """An empty batch sends nothing; a task of another channel is a ValueError; a
    closed channel raises RuntimeError; aclose is idempotent; the digest settings are
    exposed for the caller."""
    ch = channel_for(smtp_server.settings(), digest="1h", max_per_digest=50)
    assert ch.digest_window == timedelta(hours=1)
    assert await ch.send([]) == []
    assert smtp_server.handler.data_commands == 0
    with pytest.raises(ValueError, match="not acme-ai/email"):
        await ch.send([make_task()])  # a webhook task
    async with ch:
        pass
    await ch.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await ch.send([_task()])


# ------------------------------------------------------- no exception escapes (one place)


def _aiosmtplib_exception_classes() -> list[type[Exception]]:
    return sorted(
        (obj for obj in vars(aiosmtplib).values()
         if inspect.isclass(obj) and issubclass(obj, Exception)
         and obj.__module__.startswith("aiosmtplib")),
        key=lambda cls: cls.__name__,
    )


def _instantiate(cls: type[Exception]) -> Exception:
    refused = aiosmtplib.SMTPRecipientRefused(550, "5.1.1 no", "a@b.example.invalid")
    for args in ((451, "4.3.0 later", "a@b.example.invalid"), (451, "4.3.0 later"),
                 ([refused],), ("boom",)):
        try:
            return cls(*args)
        except TypeError:
            continue
    raise AssertionError(f"cannot build {cls}")


@pytest.mark.parametrize("cls", _aiosmtplib_exception_classes(), ids=lambda c: c.__name__)
def test_every_aiosmtplib_exception_translates_to_a_channel_error(
    cls: type[Exception],
) -> None:
    """translate_error maps every exception class aiosmtplib exports to a ChannelError;
    replies keep their code (4xx retriable, 5xx not)."""
    exc = _instantiate(cls)
    error = translate_error(exc, timeout=10)
    assert isinstance(error, ChannelError)
    code = getattr(exc, "code", None)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        assert error.status_code == code
        assert error.retriable is (code == 451)
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPServerDisconnected):
        assert error.retriable


@pytest.mark.parametrize(
    ("exc", "kind", "prefix"),
    [
        (aiosmtplib.SMTPConnectError("refused"), OutcomeKind.TRANSIENT, "connection failed"),
        (aiosmtplib.SMTPServerDisconnected("gone"), OutcomeKind.TRANSIENT, "connection lost"),
        (aiosmtplib.SMTPReadTimeoutError("slow"), OutcomeKind.TRANSIENT, "timed out after 30s"),
        (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad"), OutcomeKind.PERMANENT,
         "authentication failed: 535 5.7.8 bad"),
        (aiosmtplib.SMTPSenderRefused(553, "5.7.1 no", "r@x.example.invalid"),
         OutcomeKind.PERMANENT, "sender refused: 553"),
        (aiosmtplib.SMTPResponseException(-1, "Malformed"), OutcomeKind.TRANSIENT,
         "the server replied: -1 Malformed"),
        (aiosmtplib.SMTPException("The SMTP AUTH extension is not supported by this server."),
         OutcomeKind.PERMANENT, "SMTP error"),
        (ssl.SSLCertVerificationError("certificate verify failed"), OutcomeKind.TRANSIENT,
         "TLS handshake failed"),
        (ConnectionResetError("reset"), OutcomeKind.TRANSIENT, "connection lost"),
        (RuntimeError("bug"), OutcomeKind.TRANSIENT, "internal error: RuntimeError"),
    ],
)
async def test_exceptions_inside_the_client_become_outcomes(
    exc: Exception, kind: OutcomeKind, prefix: str, monkeypatch: pytest.MonkeyPatch,
    smtp_ca_file: Path, channel_for: _ChannelFactory,
) -> None:
    """Whatever aiosmtplib raises while sending (or a bug), send returns an outcome for
    every task and nothing escapes."""

    async def connect(self: aiosmtplib.SMTP, **kwargs: Any) -> None:
        return None

    async def sendmail(self: aiosmtplib.SMTP, *args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(aiosmtplib.SMTP, "connect", connect)
    monkeypatch.setattr(aiosmtplib.SMTP, "is_connected", property(lambda self: False))
    monkeypatch.setattr(aiosmtplib.SMTP, "sendmail", sendmail)
    settings = SmtpSettings(host="127.0.0.1", port=_closed_port(), from_address=FROM,
                            ca_file=smtp_ca_file)
    outcomes = await channel_for(settings, max_per_digest=1).send([_task(), _task()])
    assert [o.kind for o in outcomes] == [kind, kind]
    assert all(o.error is not None and o.error.startswith(prefix) for o in outcomes)


# ------------------------------------------------------------------------- settings


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """A complete NOTICE_RELAY_SMTP_* environment, the password in a file."""
    password = tmp_path / "smtp-password"
    password.write_text(PASSWORD + "\n", encoding="utf-8")
    return {
        "NOTICE_RELAY_SMTP_HOST": "smtp.relay.example.invalid",
        "NOTICE_RELAY_SMTP_PORT": "2587",
        "NOTICE_RELAY_SMTP_TLS": "STARTTLS",
        "NOTICE_RELAY_SMTP_USERNAME": "relay",
        "NOTICE_RELAY_SMTP_PASSWORD_FILE": str(password),
        "NOTICE_RELAY_SMTP_FROM": "Notice Relay <relay@relay.example.invalid>",
        "NOTICE_RELAY_SMTP_CA_FILE": str(tmp_path / "ca.pem"),
        "NOTICE_RELAY_SMTP_TIMEOUT": "15s",
        "NOTICE_RELAY_SMTP_HELO_NAME": "relay.example.invalid",
        "NOTICE_RELAY_SMTP_MAX_MESSAGE_BYTES": "5000000",
    }


def test_settings_from_the_environment(environ: dict[str, str]) -> None:
    """Every NOTICE_RELAY_SMTP_* variable is read; the password file's trailing newline
    is dropped; the password never appears in repr."""
    s = SmtpSettings.from_env(environ)
    assert (s.host, s.port, s.tls, s.username) == (
        "smtp.relay.example.invalid", 2587, TlsMode.STARTTLS, "relay")
    assert s.password == PASSWORD
    assert s.timeout == timedelta(seconds=15)
    assert s.helo_name == "relay.example.invalid"
    assert s.max_message_bytes == 5_000_000
    assert s.ca_file == Path(environ["NOTICE_RELAY_SMTP_CA_FILE"])
    assert s.sender.addr_spec == "relay@relay.example.invalid"
    assert s.sender.display_name == "Notice Relay"
    assert PASSWORD not in repr(s)
    minimal = SmtpSettings.from_env({"NOTICE_RELAY_SMTP_HOST": "mx.example.invalid",
                                     "NOTICE_RELAY_SMTP_FROM": "r@relay.example.invalid",
                                     "NOTICE_RELAY_SMTP_TLS": "tls"})
    assert minimal.effective_port == 465
    assert minimal.username is None
    assert SmtpSettings("h.example.invalid", "r@relay.example.invalid").effective_port == 587


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"NOTICE_RELAY_SMTP_HOST": ""}, "NOTICE_RELAY_SMTP_HOST is not set"),
        ({"NOTICE_RELAY_SMTP_FROM": ""}, "NOTICE_RELAY_SMTP_FROM is not set"),
        ({"NOTICE_RELAY_SMTP_FROM": "relay"}, "NOTICE_RELAY_SMTP_FROM: 'relay' is not an address"),
        ({"NOTICE_RELAY_SMTP_FROM": "a@b.example.invalid\r\nBcc: x@y.example.invalid"},
         "is not an address"),
        ({"NOTICE_RELAY_SMTP_TLS": "ssl"}, "must be starttls, tls or none"),
        ({"NOTICE_RELAY_SMTP_PORT": "smtp"}, "NOTICE_RELAY_SMTP_PORT must be an integer"),
        ({"NOTICE_RELAY_SMTP_PORT": "70000"}, "must be 1-65535"),
        ({"NOTICE_RELAY_SMTP_TIMEOUT": "30"}, "NOTICE_RELAY_SMTP_TIMEOUT: invalid duration"),
        ({"NOTICE_RELAY_SMTP_PASSWORD": "x"}, "not both"),
        ({"NOTICE_RELAY_SMTP_PASSWORD_FILE": "/nonexistent/pw"}, "does not exist"),
        ({"NOTICE_RELAY_SMTP_USERNAME": ""}, "go together"),
        ({"NOTICE_RELAY_SMTP_TLS": "none"}, "clear text"),
        ({"NOTICE_RELAY_SMTP_HOST": "smtp host"}, "is not a host name"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_variable(
    environ: dict[str, str], changes: dict[str, str], message: str
) -> None:
    """Each bad or missing variable is a ConfigError that names it, never with the
    password in it."""
    environ.update(changes)
    with pytest.raises(ConfigError, match=message) as info:
        SmtpSettings.from_env(environ)
    assert PASSWORD not in str(info.value)


def test_unreadable_ca_file_fails_when_the_channel_is_built(tmp_path: Path) -> None:
    """A CA file that is missing or not PEM stops the channel at start-up."""
    developer, config = _developer()
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        if path.name == "junk.pem":
            path.write_text("not a certificate", encoding="utf-8")
        settings = SmtpSettings("smtp.example.invalid", FROM, ca_file=path)
        with pytest.raises(ConfigError, match="NOTICE_RELAY_SMTP_CA_FILE"):
            EmailChannel(developer, config, settings)


async def test_build_channel_reads_the_smtp_settings(environ: dict[str, str]) -> None:
    """build_channel gives an EmailChannel for an email config, SMTP settings from the
    environment; a missing variable is a ConfigError naming the developer and it."""
    developer, config = _developer(digest="1h", max_per_digest=10)
    environ.pop("NOTICE_RELAY_SMTP_CA_FILE")
    ch = build_channel(developer, config, environ=environ)
    assert isinstance(ch, EmailChannel)
    assert ch.digest_window == timedelta(hours=1)
    assert ch.max_per_digest == 10
    await ch.aclose()
    environ.pop("NOTICE_RELAY_SMTP_HOST")
    with pytest.raises(ConfigError, match=r"developer 'acme-ai', channel 'email': "
                                          r"NOTICE_RELAY_SMTP_HOST is not set"):
        build_channel(developer, config, environ=environ)


async def test_a_malformed_delivery_id_fails_alone(
    smtp_server: SmtpServer, channel_for: _ChannelFactory
) -> None:
    """A task whose delivery id is not a plain token is permanent on its own; the other
    tasks of the batch are still sent, in one message, and outcomes keep their order."""
    good_a, bad, good_b = _task(), _task(delivery_id="dlv-1\r\nBcc: x@y.example.invalid"), _task()
    outcomes = await channel_for(smtp_server.settings()).send([good_a, bad, good_b])
    assert [o.kind for o in outcomes] == [
        OutcomeKind.DELIVERED, OutcomeKind.PERMANENT, OutcomeKind.DELIVERED
    ]
    assert [o.delivery_id for o in outcomes] == [good_a.delivery_id, bad.delivery_id,
                                                 good_b.delivery_id]
    assert outcomes[1].error == "cannot build the message: unsafe delivery id"
    [stored] = smtp_server.messages
    assert "Bcc" not in stored.parsed()
