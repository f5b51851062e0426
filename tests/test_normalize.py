"""Normalization (declarations → notices) and the use vocabulary: every rule, and the
property that normalizing twice equals normalizing once."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notice_relay.canonical import canonical_json
from notice_relay.errors import DeclarationInvalid
from notice_relay.models import (
    NOTICE_SCHEMA_V1,
    AckInfo,
    Action,
    Declaration,
    Notice,
    NoticeWork,
    Standards,
    Use,
)
from notice_relay.normalize import (
    FINGERPRINT_EXCLUDES,
    artist_ref,
    fingerprint,
    match_key,
    normalize,
    normalize_name,
    notice_id,
    renormalize,
)
from notice_relay.standards import IPTC_VOCAB, expand_uses, render_standards
from notice_relay.validate import parse_declaration

RELAYED = datetime(2026, 11, 1, 9, 30, tzinfo=UTC)


def fullwidth(text: str) -> str:
    """``text`` in full-width forms, as Japanese input methods type it."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def declaration(**overrides: Any) -> dict[str, Any]:
    """A valid declaration as JSON data; top-level keys overridable."""
    data: dict[str, Any] = {
        "schema": "notice-relay/declaration/v1",
        "declaration_id": "af-0001",
        "publisher_id": "artfolio",
        "action": "opt_out",
        "declared_at": "2026-03-01T12:00:00+09:00",
        "artist": {"artist_id": "u-1", "display_name": "Mara Quill"},
        "works": [{"url": "https://www.artstation.com/artwork/Xk3Lm9"}],
        "uses": ["train-ai"],
        "targets": ["*"],
    }
    data.update(overrides)
    return data


def parse(data: dict[str, Any]) -> Declaration:
    """Validate JSON data as the relay does."""
    return parse_declaration(json.dumps(data).encode())


def notice_for(**overrides: Any) -> Notice:
    """The notice of ``declaration(**overrides)``."""
    return normalize(parse(declaration(**overrides)), relayed_at=RELAYED)


# -------------------------------------------------------------------- names


@pytest.mark.parametrize(("raw", "expected"), [
    (fullwidth("hanako"), "hanako"),
    ("山田\u3000花子", "山田 花子"),
    ("ﬁne ﬂow", "fine flow"),
    ("Ⅻ ㍻", "XII 平成"),
    ("  Mara \t\n Quill  ", "Mara Quill"),
    ("Mara\u00a0Quill", "Mara Quill"),
    ("Ma\x00ra\x07 Qu\x7fill\x9f", "Mara Quill"),
    ("Ar\u200btist", "Artist"),
    ("Ar\u00adtist", "Artist"),
    ("\ufeffArtist", "Artist"),
    ("Ar\u202etsit\u202c", "Artsit"),
    ("Ar\u200etist\u200f", "Artist"),
    ("e\x00\u0301", "\u00e9"),
    ("👩\u200d🎨 Kei", "👩\u200d🎨 Kei"),
    ("Mara Quill", "Mara Quill"),
])
def test_normalize_name(raw: str, expected: str) -> None:
    """normalize_name applies NFKC (full-width letters and spaces, ligatures,
    compatibility forms), removes control and invisible characters (zero-width
    space, soft hyphen, BOM, bidi controls and marks) but keeps ZWJ (emoji), collapses
    and trims whitespace, and recomposes a base letter and a mark a control separated."""
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(("a", "b"), [
    ("HANAKO", "hanako"),
    (fullwidth("hanako"), "Hanako"),
    ("Straße", "STRASSE"),
    ("  Mara   QUILL ", "mara quill"),
    ("Ar\u200btist", "ARTIST"),
])
def test_match_key_equates_spellings(a: str, b: str) -> None:
    """match_key is normalize_name then case folding: these spellings match."""
    assert match_key(a) == match_key(b)


def test_match_key_keeps_different_names_apart() -> None:
    """Names that differ in more than spelling keep different keys."""
    assert match_key("Mara Quill") != match_key("Mara Quil")
    assert match_key("はなこ") != match_key("ハナコ")


@FUZZ
@given(st.text(max_size=40))
def test_name_functions_are_idempotent(text: str) -> None:
    """normalize_name and match_key are fixed points of themselves, and a key does
    not depend on whether the name was normalized first."""
    name = normalize_name(text)
    assert normalize_name(name) == name
    key = match_key(text)
    assert match_key(key) == key
    assert match_key(name) == key
    assert name == name.strip()
    assert "  " not in name


# ---------------------------------------------------------------- ids and hashes


def test_artist_ref_is_opaque_and_stable() -> None:
    """artist_ref is "art_" + 32 hex digits, the same for the same ids in every run
    (the value is pinned: changing it would split every artist's history)."""
    ref = artist_ref("artfolio", "u-48213")
    assert re.fullmatch(r"art_[0-9a-f]{32}", ref)
    assert ref == artist_ref("artfolio", "u-48213")
    assert "u-48213" not in ref
    assert "artfolio" not in ref
    expected = hashlib.sha256(
        b"notice-relay/artist-ref/v1\x00"
        + (8).to_bytes(8, "big") + b"artfolio"
        + (7).to_bytes(8, "big") + b"u-48213"
    ).hexdigest()[:32]
    assert ref == "art_" + expected


@pytest.mark.parametrize("func", [artist_ref, notice_id])
def test_ids_are_unambiguous(func: Any) -> None:
    """The two ids are length-prefixed before hashing: moving a separator between
    them, or an empty part, gives a different id."""
    assert func("a/b", "c") != func("a", "b/c")
    assert func("ab", "") != func("a", "b")
    assert func("a\x00b", "c") != func("a", "b\x00c")
    assert func("artfolio", "1") != func("pixelboard", "1")


def test_notice_id_differs_from_artist_ref() -> None:
    """notice_id is "ntc_" + 32 hex digits, domain-separated from artist_ref."""
    nid = notice_id("artfolio", "af-0001")
    assert re.fullmatch(r"ntc_[0-9a-f]{32}", nid)
    assert nid[4:] != artist_ref("artfolio", "af-0001")[4:]


def test_fingerprint_covers_content_but_not_relay_fields() -> None:
    """The fingerprint is the SHA-256 of the canonical JSON of the notice without
    fingerprint, relayed_at, version and ack: relaying the same content again keeps it,
    changing the content changes it."""
    notice = notice_for()
    content = notice.model_dump(mode="json", by_alias=True, exclude=set(FINGERPRINT_EXCLUDES))
    assert notice.fingerprint == hashlib.sha256(canonical_json(content)).hexdigest()
    ack = AckInfo(url="https://relay.example.invalid/ack/1", due_by=RELAYED)
    again = notice.model_copy(update={"relayed_at": RELAYED + timedelta(days=3), "version": 7,
                                      "ack": ack, "fingerprint": "x"})
    assert fingerprint(again) == notice.fingerprint
    changed = notice.model_copy(update={"all_works": not notice.all_works})
    assert fingerprint(changed) != notice.fingerprint


def test_fingerprint_ignores_how_a_time_is_written() -> None:
    """The same instant written with another offset hashes the same."""
    notice = notice_for()
    tokyo = notice.declared_at.astimezone(timezone(timedelta(hours=9)))
    assert fingerprint(notice.model_copy(update={"declared_at": tokyo})) == notice.fingerprint


# ----------------------------------------------------------------- normalize()


def test_notice_carries_ids_schema_and_relay_fields() -> None:
    """A notice names its schema, a stable notice_id, the declaration and publisher,
    an artist_ref (not the artist_id), the version given, and a valid fingerprint."""
    decl = parse(declaration())
    notice = normalize(decl, relayed_at=RELAYED, version=3)
    assert notice.schema_ == NOTICE_SCHEMA_V1
    assert notice.notice_id == notice_id("artfolio", "af-0001")
    assert (notice.declaration_id, notice.publisher_id) == ("af-0001", "artfolio")
    assert notice.artist.artist_ref == artist_ref("artfolio", "u-1")
    assert "u-1" not in notice.model_dump_json()
    assert notice.version == 3
    assert notice.fingerprint == fingerprint(notice)
    assert notice.action is Action.OPT_OUT


def test_contact_email_is_never_copied_and_note_is_kept() -> None:
    """The contact email appears nowhere in the notice; the artist's note is copied
    exactly as written."""
    note = "Please  don't.\nThank you\t— M."
    notice = notice_for(
        artist={"artist_id": "u-1", "display_name": "Mara",
                "contact_email": "mara@example.invalid"},
        note=note,
    )
    dumped = notice.model_dump_json()
    assert "mara@example.invalid" not in dumped
    assert "contact_email" not in dumped
    assert notice.note == note


def test_times_are_converted_to_utc() -> None:
    """declared_at and relayed_at are carried in UTC."""
    tokyo = timezone(timedelta(hours=9))
    notice = normalize(parse(declaration(declared_at="2026-03-01T12:00:00+09:00")),
                       relayed_at=datetime(2026, 11, 1, 18, 30, tzinfo=tokyo))
    assert notice.declared_at == datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
    assert notice.declared_at.utcoffset() == timedelta(0)
    assert notice.relayed_at.utcoffset() == timedelta(0)
    assert notice.model_dump(mode="json")["declared_at"] == "2026-03-01T03:00:00Z"


def test_naive_relayed_at_is_refused() -> None:
    """relayed_at without a timezone is a programming error: ValueError."""
    with pytest.raises(ValueError, match="relayed_at"):
        normalize(parse(declaration()), relayed_at=datetime(2026, 11, 1))


def test_uses_expanded_sorted_and_standards_rendered() -> None:
    """Uses are expanded (train-ai implies train-genai), deduplicated and sorted, and
    the refusal is rendered for the standards."""
    notice = notice_for(uses=["prompt-name", "train-ai", "prompt-name"])
    assert notice.uses == [Use.PROMPT_NAME, Use.TRAIN_AI, Use.TRAIN_GENAI]
    assert notice.standards == render_standards([Use.TRAIN_AI, Use.PROMPT_NAME])


def test_withdrawal_renders_no_refusal() -> None:
    """A withdrawal keeps its (expanded) uses, but its standards block is empty: it
    refuses nothing."""
    notice = notice_for(action="withdraw", supersedes="af-0000", uses=["train-ai"])
    assert notice.uses == [Use.TRAIN_AI, Use.TRAIN_GENAI]
    assert notice.standards == Standards()
    assert notice.supersedes == "af-0000"


def test_works_normalized_and_deduplicated_keeping_the_first() -> None:
    """Work URLs are normalized; works whose normalized URLs match are one work, and
    the first listing wins (its title and digest); order is kept; digests are
    lower-cased and titles normalized like names."""
    digest = "AB" * 32
    notice = notice_for(works=[
        {"url": "https://www.pixiv.net/en/artworks/1?utm_source=x",
         "title": fullwidth("First") + "  one"},
        {"url": "https://x.com/KeiAoba/status/9", "sha256": digest},
        {"url": "https://pixiv.net/artworks/1/", "title": "duplicate", "sha256": "cd" * 32},
        {"url": "https://example.com/z#a", "title": "\u200b"},
        {"url": "https://example.com/z#b"},
    ])
    assert notice.works == [
        NoticeWork(url="https://www.pixiv.net/artworks/1", title="First one"),
        NoticeWork(url="https://x.com/keiaoba/status/9", sha256="ab" * 32),
        NoticeWork(url="https://example.com/z"),
    ]


def test_profiles_normalized_and_deduplicated() -> None:
    """Profile URLs are normalized and deduplicated, first occurrence first."""
    notice = notice_for(artist={"artist_id": "u-1", "display_name": "Kei", "profiles": [
        "https://twitter.com/KeiAoba", "https://pixiv.net/en/users/5", "https://x.com/keiaoba/",
        "https://www.pixiv.net/users/5",
    ]})
    assert notice.artist.profiles == ["https://x.com/keiaoba", "https://www.pixiv.net/users/5"]


def test_aliases_normalized_and_deduplicated_by_match_key() -> None:
    """Aliases are normalized; an alias that matches the display name or an earlier
    alias once case-folded is dropped, an invisible-only alias too; match_keys lists
    the display name's key, then each kept alias's."""
    notice = notice_for(artist={
        "artist_id": "u-1",
        "display_name": "山田\u3000花子",
        "aliases": [fullwidth("hanako"), "Hanako Yamada", "HANAKO", "山田 花子", "\u200b",
                    "はなこ"],
    })
    assert notice.artist.display_name == "山田 花子"
    assert notice.artist.aliases == ["hanako", "Hanako Yamada", "はなこ"]
    assert notice.artist.match_keys == ["山田 花子", "hanako", "hanako yamada", "はなこ"]


def test_display_name_of_invisible_characters_is_refused() -> None:
    """A display name with nothing visible cannot become a notice: DeclarationInvalid
    on artist.display_name (parse_declaration reports this before normalize runs)."""
    decl = Declaration.model_validate_json(json.dumps(declaration(
        artist={"artist_id": "u-1", "display_name": "\u200b\u00ad"})))
    with pytest.raises(DeclarationInvalid) as info:
        normalize(decl, relayed_at=RELAYED)
    assert [e.field for e in info.value.errors] == ["artist.display_name"]


def test_renormalize_fixes_an_unnormalized_notice_and_keeps_relay_fields() -> None:
    """renormalize applies every rule to a notice that was not normalized (URLs,
    names, uses, standards, UTC, fingerprint) and keeps what it cannot derive:
    notice_id, artist_ref, version, ack."""
    good = notice_for(artist={"artist_id": "u-1", "display_name": "Mara Quill",
                              "aliases": ["mara"]})
    ack = AckInfo(url="https://relay.example.invalid/ack/1", due_by=RELAYED)
    messy = good.model_copy(update={
        "artist": good.artist.model_copy(update={
            "display_name": " Mara\u3000Quill ", "aliases": ["MARA", "Mara Quill", "mq"],
            "match_keys": [], "profiles": ["HTTPS://X.com/Mara/", "https://x.com/mara"]}),
        "works": [NoticeWork(url="https://pixiv.net/en/artworks/1", sha256="AA" * 32)],
        "uses": [Use.TRAIN_AI],
        "standards": Standards(),
        "declared_at": good.declared_at.astimezone(timezone(timedelta(hours=-5))),
        "version": 4,
        "ack": ack,
        "fingerprint": "stale",
    })
    fixed = renormalize(messy)
    assert fixed.artist.display_name == "Mara Quill"
    assert fixed.artist.aliases == ["MARA", "mq"]
    assert fixed.artist.match_keys == ["mara quill", "mara", "mq"]
    assert fixed.artist.profiles == ["https://x.com/mara"]
    assert fixed.works == [NoticeWork(url="https://www.pixiv.net/artworks/1", sha256="aa" * 32)]
    assert fixed.uses == [Use.TRAIN_AI, Use.TRAIN_GENAI]
    assert fixed.standards == render_standards([Use.TRAIN_AI])
    assert fixed.declared_at.utcoffset() == timedelta(0)
    assert (fixed.notice_id, fixed.artist.artist_ref, fixed.version, fixed.ack) == (
        good.notice_id, good.artist.artist_ref, 4, ack)
    assert fixed.fingerprint == fingerprint(fixed)
    assert renormalize(fixed) == fixed


# ------------------------------------------------------- normalizing twice (property)

_NAME_CHARS = st.sampled_from([
    *"aBcXyZ09 -_.@'", *fullwidth("hA"), "山", "田", "花", "子", "は", "な", "ﬁ", "ß", "É",
    "e\u0301", "\u3000", "\u00a0", "\u200b", "\u00ad", "\u200d", "👩",
])
_NAMES = st.lists(_NAME_CHARS, min_size=1, max_size=12).map("".join).filter(
    lambda s: bool(s.strip()) and bool(normalize_name(s)))
_URLS = st.builds(
    "{}://{}{}{}{}".format,
    st.sampled_from(["http", "https", "HTTPS"]),
    st.sampled_from(["www.pixiv.net", "pixiv.net", "x.com", "mobile.twitter.com", "Example.COM",
                     "artstation.com", "www.deviantart.com", "bücher.example", "例え.jp"]),
    st.sampled_from(["", ":443", ":80", ":8080"]),
    st.sampled_from(["", "/", "/en/artworks/12", "/artworks/12/", "/users/7", "/KeiAoba",
                     "/a/./b/../c", "/%7euser", "/作品", "/member_illust.php"]),
    st.sampled_from(["", "?utm_source=x", "?illust_id=12", "?a=1&fbclid=2&b=3", "#frag",
                     "?s=20&t=x", "?q=%e4"]),
)
_HEX = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)
_OFFSETS = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: timezone(timedelta(minutes=m)))


@st.composite
def declarations(draw: st.DrawFn) -> dict[str, Any]:
    """Valid declarations as JSON data, full of things normalization changes."""
    works = draw(st.lists(st.fixed_dictionaries(
        {"url": _URLS}, optional={"sha256": _HEX, "title": _NAMES}), max_size=6))
    action = draw(st.sampled_from(["opt_out", "withdraw"]))
    when = draw(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2026, 1, 1)))
    data: dict[str, Any] = {
        "schema": "notice-relay/declaration/v1",
        "declaration_id": draw(st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True)),
        "publisher_id": draw(st.sampled_from(["artfolio", "pixelboard"])),
        "action": action,
        "declared_at": when.replace(tzinfo=draw(_OFFSETS)).isoformat(),
        "artist": draw(st.fixed_dictionaries(
            {"artist_id": st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
             "display_name": _NAMES},
            optional={"aliases": st.lists(_NAMES, max_size=6),
                      "profiles": st.lists(_URLS, max_size=6),
                      "contact_email": st.just("artist@example.invalid")})),
        "works": works,
        "all_works": draw(st.booleans()) or not works,
        "uses": draw(st.lists(st.sampled_from([u.value for u in Use]), min_size=1, max_size=6)),
        "targets": draw(st.sampled_from([["*"], ["acme-ai"], ["acme-ai", "canvas-research"]])),
    }
    if action == "withdraw":
        data["supersedes"] = "earlier-" + data["declaration_id"][:100]
    if draw(st.booleans()):
        data["note"] = draw(st.text(max_size=50).filter(
            lambda s: all(c in "\n\t" or c.isprintable() for c in s)))
    return data


@FUZZ
@given(declarations())
def test_normalizing_twice_equals_normalizing_once(data: dict[str, Any]) -> None:
    """For any valid declaration: parse_declaration accepts it, normalize succeeds,
    renormalize returns an equal notice (field by field and byte for byte), the
    fingerprint is that of the content, and the contact email is not in it."""
    notice = normalize(parse(data), relayed_at=RELAYED)
    again = renormalize(notice)
    assert again == notice
    assert again.model_dump_json() == notice.model_dump_json()
    assert notice.fingerprint == fingerprint(notice)
    assert "artist@example.invalid" not in notice.model_dump_json()
    assert normalize(parse(data), relayed_at=RELAYED) == notice


# ------------------------------------------------------------------- standards


def test_expand_uses_adds_implications_dedups_and_sorts() -> None:
    """train-ai implies train-genai; duplicates go; the result is sorted by token;
    tokens may be given as strings."""
    assert expand_uses(["train-ai"]) == [Use.TRAIN_AI, Use.TRAIN_GENAI]
    assert expand_uses([Use.TRAIN_GENAI]) == [Use.TRAIN_GENAI]
    assert expand_uses(["prompt-name", "data-mining", "prompt-name", "ai-inference"]) == [
        Use.AI_INFERENCE, Use.DATA_MINING, Use.PROMPT_NAME]
    assert expand_uses([]) == []
    with pytest.raises(ValueError):
        expand_uses(["train-everything"])


_CAWG = "cawg."
_NOT: Final = "notAllowed"


@pytest.mark.parametrize(("use", "expected"), [
    (Use.TRAIN_AI, Standards(
        aipref="train-ai=n",
        cawg={_CAWG + "ai_generative_training": _NOT, _CAWG + "ai_training": _NOT},
        iptc=[IPTC_VOCAB + "DMI-PROHIBITED-AIMLTRAINING",
              IPTC_VOCAB + "DMI-PROHIBITED-GENAIMLTRAINING"],
        tdmrep=1)),
    (Use.TRAIN_GENAI, Standards(
        aipref="train-ai=n", cawg={_CAWG + "ai_generative_training": _NOT},
        iptc=[IPTC_VOCAB + "DMI-PROHIBITED-GENAIMLTRAINING"], tdmrep=1)),
    (Use.DATA_MINING, Standards(
        cawg={_CAWG + "data_mining": _NOT}, iptc=[IPTC_VOCAB + "DMI-PROHIBITED"], tdmrep=1)),
    (Use.AI_INFERENCE, Standards(cawg={_CAWG + "ai_inference": _NOT})),
    (Use.PROMPT_NAME, Standards(cawg={_CAWG + "ai_inference": _NOT})),
])
def test_render_standards_per_use(use: Use, expected: Standards) -> None:
    """Each use renders as DESIGN.md's table says: AIPREF train-ai=n for either
    training token (AIPREF's train-ai is generative training), the CAWG entries, the
    IPTC PLUS data-mining URIs, TDMRep reservation for training and mining; prompt-name
    maps to the nearest CAWG entry, ai_inference, and nothing else."""
    assert render_standards([use]) == expected


def test_render_standards_orders_iptc_most_restrictive_first() -> None:
    """plus:DataMining holds one value: the first listed is the most restrictive."""
    rendered = render_standards(list(Use))
    assert rendered.iptc == [IPTC_VOCAB + "DMI-PROHIBITED",
                             IPTC_VOCAB + "DMI-PROHIBITED-AIMLTRAINING",
                             IPTC_VOCAB + "DMI-PROHIBITED-GENAIMLTRAINING"]
    assert set(rendered.cawg) == {"cawg.ai_training", "cawg.ai_generative_training",
                                  "cawg.data_mining", "cawg.ai_inference"}
    assert rendered.aipref == "train-ai=n"
    assert rendered.tdmrep == 1


def test_render_standards_never_grants() -> None:
    """Nothing refused renders nothing: no tdm-reservation 0, no AIPREF "y"."""
    assert render_standards([]) == Standards()
