"""The digest email as rendered, without any server: content of the text and HTML
parts, the notices.json attachment, the headers, Message-ID, and how a batch is split.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

import pytest
from builders import make_notice, make_task

from notice_relay.channels import email_render
from notice_relay.channels.email_render import (
    ATTACHMENT_NAME,
    DELIVERY_IDS_HEADER,
    NOTICE_BATCH_SCHEMA_V1,
    POLICY,
    NoticeBatch,
    build_message,
    estimated_size,
    message_id,
    render_html,
    render_text,
    split_digest,
    subject,
)
from notice_relay.models import (
    AckInfo,
    Action,
    ChannelType,
    DeliveryTask,
    Notice,
    NoticeArtist,
    NoticeWork,
    Standards,
    Use,
)

SENDER = Address(display_name="notice-relay", addr_spec="relay@relay.example.invalid")
TO = ["optout@acme.example.invalid", "legal@acme.example.invalid"]
DATE = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
#: The only top-level headers a digest message may carry.
EXPECTED_HEADERS = {
    "From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", DELIVERY_IDS_HEADER,
    "MIME-Version", "Content-Type",
}
HOSTILE = "Evil\r\nBcc: victim@elsewhere.example.invalid\r\n\r\n<script>alert(1)</script>"


def _task(**notice: Any) -> DeliveryTask:
    return make_task(channel="email", channel_type=ChannelType.EMAIL,
                     notice=make_notice(**notice))


def _artist(**fields: Any) -> NoticeArtist:
    base: dict[str, Any] = {
        "artist_ref": "ar_1", "display_name": "Mika Tanaka", "aliases": ["mikatan"],
        "match_keys": ["mika tanaka", "mikatan"], "profiles": ["https://www.pixiv.net/users/1234"],
    }
    base.update(fields)
    return NoticeArtist(**base)


def _message(tasks: list[DeliveryTask], name: str = "Acme AI") -> EmailMessage:
    msg = build_message(tasks, developer_name=name, sender=SENDER, recipients=TO, date=DATE,
                        domain="relay.example.invalid")
    return _reparse(msg.as_bytes(policy=email.policy.SMTP))


def _reparse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _parts(msg: EmailMessage) -> tuple[str, str, bytes]:
    """The text, the HTML and the attachment of a parsed digest message."""
    assert msg.get_content_type() == "multipart/mixed"
    alternative, attachment = msg.iter_parts()
    assert isinstance(alternative, EmailMessage)
    assert isinstance(attachment, EmailMessage)
    assert alternative.get_content_type() == "multipart/alternative"
    plain, html_part = alternative.iter_parts()
    assert isinstance(plain, EmailMessage)
    assert isinstance(html_part, EmailMessage)
    assert plain.get_content_type() == "text/plain"
    assert html_part.get_content_type() == "text/html"
    assert attachment.get_content_type() == "application/json"
    assert attachment.get_filename() == ATTACHMENT_NAME
    assert attachment.get_content_disposition() == "attachment"
    payload = attachment.get_content()
    assert isinstance(payload, bytes)
    return plain.get_content(), html_part.get_content(), payload


# --------------------------------------------------------------------------- content


def test_text_and_html_list_every_field_of_every_notice() -> None:
    """Both parts show, per notice: display name, aliases, profiles, works, uses, the
    four standards renderings, declared_at, notice id and delivery id."""
    tasks = [_task(), _task(artist=_artist(display_name="Jo Ruiz", aliases=["jr", "ruizart"]))]
    text, html_text, _ = _parts(_message(tasks))
    for part in (text, html_text):
        assert "Notice 1 of 2" in part
        assert "Notice 2 of 2" in part
        for task in tasks:
            notice = task.notice
            assert notice.artist.display_name in part
            for alias in notice.artist.aliases:
                assert alias in part
            assert notice.works[0].url in part
            assert notice.notice_id in part
            assert task.delivery_id in part
            assert notice.declared_at.strftime("%Y-%m-%dT%H:%M:%SZ") in part
        assert "https://www.pixiv.net/users/1234" in part
        assert "Dawn" in part
        assert "train-ai, train-genai" in part or "train-ai</code>, <code>train-genai" in part
        assert "train-ai=n" in part                                  # AIPREF
        assert "cawg.ai_training: notAllowed" in part                # CAWG
        assert "DMI-PROHIBITED-AIMLTRAINING" in part                 # IPTC
        assert "tdm-reservation 1" in part                           # TDMRep
        assert "Acknowledge" not in part
    assert '<a href="https://www.pixiv.net/users/1234">' in html_text


def test_ack_link_appears_when_the_notice_has_one() -> None:
    """A notice with an ack block shows its ack URL and due date, in text and HTML."""
    due = DATE + timedelta(days=30)
    ack = AckInfo(url="https://relay.example.invalid/ack/tok-123", due_by=due)
    text, html_text, _ = _parts(_message([_task(ack=ack), _task()]))
    assert "https://relay.example.invalid/ack/tok-123" in text
    assert "2025-03-31T12:00:00Z" in text
    assert "Please acknowledge" in text
    assert '<a href="https://relay.example.invalid/ack/tok-123">' in html_text
    assert text.count("Acknowledge at:") == 1


def test_only_the_first_20_works_are_listed() -> None:
    """A notice with 25 works lists 20 and says "and 5 more"; the attachment has all 25."""
    works = [NoticeWork(url=f"https://artfolio.example.invalid/w/{i}") for i in range(25)]
    text, html_text, payload = _parts(_message([_task(works=works)]))
    for part in (text, html_text):
        assert "https://artfolio.example.invalid/w/19" in part
        assert "https://artfolio.example.invalid/w/20" not in part
        assert "and 5 more" in part
    assert len(NoticeBatch.model_validate_json(payload).notices[0].works) == 25


def test_all_works_and_withdrawals_are_said_plainly() -> None:
    """all_works is spelled out; a withdrawal says what it withdraws and is counted in
    the subject."""
    withdrawal = _task(action=Action.WITHDRAW, supersedes="decl-old", works=[], all_works=True,
                       standards=Standards())
    msg = _message([_task(), withdrawal])
    text, _, _ = _parts(msg)
    assert "ALL works of this artist, present and future" in text
    assert "withdrawal of an opt-out" in text
    assert "Withdraws:            decl-old" in text
    assert msg["Subject"] == "[notice-relay] 2 AI opt-out notices (incl. 1 withdrawal) for Acme AI"


def test_attachment_parses_back_into_notice_v1_objects() -> None:
    """notices.json is a notice-batch/v1 document whose notices validate as Notice v1
    and equal what was sent, with the delivery that carried each."""
    tasks = [_task(note="Please respect this."), _task(uses=[Use.PROMPT_NAME])]
    _, _, payload = _parts(_message(tasks))
    batch = NoticeBatch.model_validate_json(payload)
    assert batch.schema_ == NOTICE_BATCH_SCHEMA_V1
    assert batch.notices == [t.notice for t in tasks]
    assert [(d.delivery_id, d.notice_id) for d in batch.deliveries] == [
        (t.delivery_id, t.notice.notice_id) for t in tasks
    ]
    # Each notice is a Notice v1 on its own, as a developer's pipeline would read it.
    for raw in json.loads(payload)["notices"]:
        assert Notice.model_validate_json(json.dumps(raw)).schema_ == "notice-relay/notice/v1"


# ------------------------------------------------------------------- headers and safety


def test_headers_are_exactly_the_ones_we_set() -> None:
    """Top-level headers: From, To, Subject, Date, Message-ID, Auto-Submitted, the
    delivery ids, and the MIME headers; nothing else."""
    tasks = [_task(), _task(), _task()]
    msg = _message(tasks)
    assert set(msg.keys()) == EXPECTED_HEADERS
    assert len(msg.keys()) == len(EXPECTED_HEADERS)
    assert msg["From"] == "notice-relay <relay@relay.example.invalid>"
    assert [a.addr_spec for a in msg["To"].addresses] == TO
    assert msg["Subject"] == "[notice-relay] 3 AI opt-out notices for Acme AI"
    assert msg["Date"].datetime == DATE
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Message-ID"] == message_id([t.delivery_id for t in tasks], "relay.example.invalid")
    assert msg[DELIVERY_IDS_HEADER] == ", ".join(t.delivery_id for t in tasks)


def test_header_classes_are_built_once_per_name_and_change_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The digest policy builds one class per header name (the standard registry
    builds one per header), and the message it gives is byte for byte the same."""
    tasks = [_task(), _task()]

    def build() -> EmailMessage:
        return build_message(tasks, developer_name="Acme AI", sender=SENDER, recipients=TO,
                             date=DATE, domain="relay.example.invalid")

    def blank_boundaries(data: bytes) -> bytes:
        return re.sub(rb"={15}\d+==", b"BOUNDARY", data)

    first, second = build(), build()
    assert first.keys() == second.keys()
    for name in first:
        assert type(first[name]) is type(second[name])
    ours = blank_boundaries(first.as_bytes(policy=POLICY))

    monkeypatch.setattr(email_render, "POLICY", email.policy.SMTP)
    stock_a, stock_b = build(), build()
    assert type(stock_a["Subject"]) is not type(stock_b["Subject"])
    stock = blank_boundaries(stock_a.as_bytes(policy=email.policy.SMTP))
    assert b"BOUNDARY" in ours
    assert ours == stock


@pytest.mark.parametrize("where", ["display_name", "alias", "title", "note", "profile"])
def test_hostile_text_cannot_inject_a_header_or_markup(where: str) -> None:
    """CR/LF, "Bcc:" header syntax and <script> in any user-supplied field (Notice
    objects built directly, bypassing Declaration validation) stay inside the bodies:
    the headers are exactly ours, and the HTML has no raw <script>."""
    fields: dict[str, Any] = {}
    if where == "display_name":
        fields["artist"] = _artist(display_name=HOSTILE)
    elif where == "alias":
        fields["artist"] = _artist(aliases=[HOSTILE])
    elif where == "profile":
        fields["artist"] = _artist(profiles=[f"javascript:alert(1)//{HOSTILE}"])
    elif where == "title":
        fields["works"] = [NoticeWork(url="https://a.example.invalid/1", title=HOSTILE)]
    else:
        fields["note"] = HOSTILE
    msg = _message([_task(**fields)])
    assert set(msg.keys()) == EXPECTED_HEADERS
    assert "Bcc" not in msg
    assert [a.addr_spec for a in msg["To"].addresses] == TO
    assert msg["Subject"] == "[notice-relay] 1 AI opt-out notice for Acme AI"
    text, html_text, payload = _parts(msg)
    assert "<script" not in html_text.lower()
    assert "&lt;script&gt;" in html_text
    hrefs = re.findall(r'href="([^"]*)"', html_text)
    assert all(href.startswith("https://") for href in hrefs), hrefs
    # In the text, the hostile value never starts a line of its own (no fake fields).
    assert not any(line.lstrip().startswith("Bcc:") for line in text.splitlines())
    # The attachment carries the value exactly as the notice holds it (JSON-escaped).
    [notice] = NoticeBatch.model_validate_json(payload).notices
    assert HOSTILE in notice.model_dump_json(by_alias=True).encode().decode("unicode_escape")


def test_the_message_is_7bit_and_non_ascii_survives() -> None:
    """Non-ASCII names (and a non-ASCII developer name in the subject) are encoded:
    the bytes on the wire are ASCII, lines are short, and everything decodes back."""
    task = _task(artist=_artist(display_name="田中ミカ", aliases=["ミカたん"]))
    raw = build_message([task], developer_name="Ácme ÄI", sender=SENDER, recipients=TO,
                        date=DATE).as_bytes(policy=email.policy.SMTP)
    assert raw.isascii()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    msg = _reparse(raw)
    assert msg["Subject"] == "[notice-relay] 1 AI opt-out notice for Ácme ÄI"
    text, html_text, _ = _parts(msg)
    assert "田中ミカ" in text
    assert "ミカたん" in html_text


def test_delivery_ids_header_is_folded_and_unfolds_to_the_ids() -> None:
    """Many long delivery ids fold over several header lines (≤ 78 octets each) and
    unfold back to exactly the ids, in order."""
    tasks = [make_task(delivery_id=f"dlv_{i:064x}", channel="email",
                       channel_type=ChannelType.EMAIL) for i in range(30)]
    raw = build_message(tasks, developer_name="Acme AI", sender=SENDER, recipients=TO,
                        date=DATE).as_bytes(policy=email.policy.SMTP)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    value = _reparse(raw)[DELIVERY_IDS_HEADER]
    assert re.split(r",\s*", value.strip()) == [t.delivery_id for t in tasks]


def test_unsafe_delivery_id_is_refused() -> None:
    """A delivery id that is not a plain token never reaches a header: ValueError."""
    task = make_task(delivery_id="dlv-1\r\nBcc: x@y.example.invalid", channel="email",
                     channel_type=ChannelType.EMAIL)
    with pytest.raises(ValueError, match="unsafe delivery id"):
        build_message([task], developer_name="Acme AI", sender=SENDER, recipients=TO, date=DATE)
    with pytest.raises(ValueError, match="at least one"):
        message_id([])


def test_message_id_is_stable_for_the_same_deliveries() -> None:
    """Message-ID = <32 hex of SHA-256 over the sorted ids @domain>: the same ids in
    any order give the same id; other ids give another."""
    first = message_id(["dlv_b", "dlv_a", "dlv_c"], "relay.example.invalid")
    assert re.fullmatch(r"<[0-9a-f]{32}@relay\.example\.invalid>", first)
    assert message_id(["dlv_a", "dlv_c", "dlv_b"], "relay.example.invalid") == first
    assert message_id(["dlv_a", "dlv_b"], "relay.example.invalid") != first
    assert message_id(["dlv_a"]).endswith("@notice-relay>")


def test_subject_has_no_user_text() -> None:
    """The subject holds counts and the developer's configured name, never a
    notice's text."""
    task = _task(artist=_artist(display_name=HOSTILE))
    assert subject([task], "Acme AI") == "[notice-relay] 1 AI opt-out notice for Acme AI"
    injected = subject([task], "Acme\r\nBcc: x")
    assert injected == "[notice-relay] 1 AI opt-out notice for Acme  Bcc: x"


# ---------------------------------------------------------------------------- splitting


def test_split_by_count_keeps_order() -> None:
    """max_count cuts a batch into consecutive groups, in order."""
    tasks = [_task() for _ in range(5)]
    groups = split_digest(tasks, max_count=2, max_bytes=10**9)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [t for g in groups for t in g] == tasks
    assert split_digest([], max_count=2, max_bytes=10**9) == []
    with pytest.raises(ValueError, match="max_count"):
        split_digest(tasks, max_count=0, max_bytes=10**9)


def test_split_by_size_and_an_oversized_notice_goes_alone() -> None:
    """Groups stay under max_bytes by estimate; a notice bigger than the limit still
    gets a message of its own; the estimate is above the real size."""
    works = [NoticeWork(url=f"https://artfolio.example.invalid/{'x' * 200}/{i}")
             for i in range(2000)]
    big = _task(works=works)
    small = [_task() for _ in range(3)]
    limit = estimated_size(small[0]) * 2 + 16 * 1024
    groups = split_digest([small[0], small[1], big, small[2]], max_count=100, max_bytes=limit)
    assert [len(g) for g in groups] == [2, 1, 1]
    assert groups[1] == [big]
    real = len(build_message([big], developer_name="Acme AI", sender=SENDER, recipients=TO,
                             date=DATE).as_bytes(policy=email.policy.SMTP))
    assert real <= estimated_size(big) + 8 * 1024
    assert render_text([big], "Acme AI").count("https://artfolio.example.invalid/") == 20
    assert render_html([big], "Acme AI").count("<li>") == 21
