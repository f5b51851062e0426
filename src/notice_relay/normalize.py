"""Normalization: a Declaration v1 becomes a Notice v1.

Pure functions, no I/O. Normalizing is idempotent: :func:`renormalize` applies every
rule again to a notice and must return an equal notice.

The rules:

- URLs (artist profiles and works) are put in normal form by
  :func:`notice_relay.urls.normalize_url`, then deduplicated; the first occurrence
  wins and order is kept. Two works with the same normalized URL are one work.
- Names (display name, aliases, work titles) go through :func:`normalize_name`:
  Unicode NFKC, control and invisible characters removed, whitespace collapsed and
  trimmed. Aliases are deduplicated by :func:`match_key` (NFKC + case folding), and
  an alias that matches the display name is dropped; ``match_keys`` lists the
  display name's key and then each alias's key, for developers to match against.
- Uses: implications expanded, duplicates removed, sorted
  (:func:`notice_relay.standards.expand_uses`); ``standards`` renders the refusal
  (:func:`notice_relay.standards.render_standards`). A withdrawal renders an empty
  ``standards``: it refuses nothing, and a pipeline reading only that block must not
  see a refusal in it.
- ``sha256`` of a work is lower-cased; ``declared_at`` and ``relayed_at`` are in UTC.
- The artist is named by an opaque, stable :func:`artist_ref`; the notice gets
  :func:`notice_id` and a :func:`fingerprint` of its content.
- The contact email is never copied: it is the publisher's, not the developers'.
- ``note`` is copied as written: it is the artist's own words.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from notice_relay.canonical import canonical_json, sha256_hex
from notice_relay.errors import DeclarationInvalid
from notice_relay.models import (
    AckInfo,
    Action,
    Declaration,
    FieldError,
    Notice,
    NoticeArtist,
    NoticeWork,
    Standards,
    Use,
)
from notice_relay.standards import expand_uses, render_standards
from notice_relay.urls import normalize_url

#: Notice fields left out of the fingerprint: they change when the same content is
#: relayed again (a new relay time, a new version) or acknowledged.
FINGERPRINT_EXCLUDES = frozenset({"fingerprint", "relayed_at", "version", "ack"})

# Invisible characters that change no glyph but defeat matching ("Ar\u200btist"):
# soft hyphen, zero-width space, the directional marks, word joiner, BOM, and the
# bidi embeddings/overrides/isolates. ZWJ and ZWNJ stay: emoji sequences and several
# scripts need them.
_INVISIBLE = frozenset(
    "\u00ad\u200b\u200e\u200f\u061c\u2060\ufeff"
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
# Each pass is idempotent in practice; the bound only guards against a future
# Unicode version surprising us with a non-converging sequence.
_MAX_PASSES = 4


def _name_pass(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = "".join(
        ch
        for ch in text
        if ch.isspace()
        or not (ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs"))
    )
    text = " ".join(text.split())
    # Removing a control character can bring a base letter and a combining mark
    # together; compose them again.
    return unicodedata.normalize("NFKC", text)


def _fixpoint(step: Any, text: str) -> str:
    for _ in range(_MAX_PASSES):
        following: str = step(text)
        if following == text:
            break
        text = following
    return text


def normalize_name(s: str) -> str:
    """A name as displayed: NFKC, control/invisible characters removed, whitespace
    runs collapsed to one space, trimmed. Idempotent."""
    return _fixpoint(_name_pass, s)


def _key_pass(text: str) -> str:
    return _name_pass(_name_pass(text).casefold())


def match_key(s: str) -> str:
    """The key two names match on: :func:`normalize_name`, case-folded, NFKC again
    (case folding can leave a string that NFKC would still change). Idempotent."""
    return _fixpoint(_key_pass, s)


def _opaque(tag: str, *parts: str) -> str:
    # Each part is length-prefixed so that ("a/b", "c") and ("a", "b/c") hash
    # differently; the tag keeps an artist_ref from ever equalling a notice_id.
    digest = hashlib.sha256(tag.encode("ascii") + b"\x00")
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:32]


def artist_ref(publisher_id: str, artist_id: str) -> str:
    """The opaque, stable reference developers see instead of the publisher's ids:
    ``art_`` + 32 hex digits of SHA-256 over both ids."""
    return "art_" + _opaque("notice-relay/artist-ref/v1", publisher_id, artist_id)


def notice_id(publisher_id: str, declaration_id: str) -> str:
    """The notice's id, stable for a declaration: ``ntc_`` + 32 hex digits."""
    return "ntc_" + _opaque("notice-relay/notice-id/v1", publisher_id, declaration_id)


def fingerprint(notice: Notice) -> str:
    """SHA-256 (hex) of the canonical JSON of the notice's content: every field but
    those in :data:`FINGERPRINT_EXCLUDES`. Datetimes are hashed in UTC, whatever
    offset the notice carries."""
    # mode="python" keeps datetimes as objects, so canonical_json writes them in UTC.
    content = notice.model_dump(mode="python", by_alias=True, exclude=set(FINGERPRINT_EXCLUDES))
    return sha256_hex(canonical_json(content))


# ------------------------------------------------------------------ the rules


def _names(display_name: str, aliases: Iterable[str]) -> tuple[str, list[str], list[str]]:
    display = normalize_name(display_name)
    if not display:
        raise DeclarationInvalid(
            "1 invalid field: artist.display_name",
            [FieldError(field="artist.display_name",
                        message="contains only invisible or control characters")],
        )
    keys = [match_key(display)]
    kept: list[str] = []
    for alias in aliases:
        name = normalize_name(alias)
        key = match_key(name)
        if not name or key in keys:
            continue
        kept.append(name)
        keys.append(key)
    return display, kept, keys


def _urls(urls: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(normalize_url(url) for url in urls))


def _works(works: Iterable[tuple[str, str | None, str | None]]) -> list[NoticeWork]:
    result: dict[str, NoticeWork] = {}
    for url, sha256, title in works:
        key = normalize_url(url)
        if key in result:
            continue  # the first listing of a work wins
        clean_title = normalize_name(title) if title is not None else ""
        result[key] = NoticeWork(
            url=key, sha256=sha256.lower() if sha256 else None, title=clean_title or None
        )
    return list(result.values())


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value.astimezone(UTC)


def _assemble(
    *,
    notice_id: str,
    declaration_id: str,
    publisher_id: str,
    action: Action,
    artist: NoticeArtist,
    works: list[NoticeWork],
    all_works: bool,
    uses: Iterable[Use],
    declared_at: datetime,
    relayed_at: datetime,
    version: int,
    supersedes: str | None,
    note: str | None,
    ack: AckInfo | None = None,
) -> Notice:
    expanded = expand_uses(uses)
    draft = Notice(
        schema_="notice-relay/notice/v1",  # NOTICE_SCHEMA_V1, spelt as the Literal it must be
        notice_id=notice_id,
        declaration_id=declaration_id,
        publisher_id=publisher_id,
        action=action,
        artist=artist,
        works=works,
        all_works=all_works,
        uses=expanded,
        standards=render_standards(expanded) if action is Action.OPT_OUT else Standards(),
        declared_at=_utc(declared_at, "declared_at"),
        relayed_at=_utc(relayed_at, "relayed_at"),
        version=version,
        supersedes=supersedes,
        note=note,
        fingerprint="",
        ack=ack,
    )
    return draft.model_copy(update={"fingerprint": fingerprint(draft)})


def normalize(decl: Declaration, *, relayed_at: datetime, version: int = 1) -> Notice:
    """Turn a validated declaration into the notice developers receive, applying
    every rule in the module docstring. ``relayed_at`` must be timezone-aware.

    Raises DeclarationInvalid when the display name is empty once invisible
    characters are removed (:func:`notice_relay.validate.parse_declaration` reports
    that earlier), and ValueError for a naive ``relayed_at`` or a ``version`` < 1.
    """
    display, aliases, keys = _names(decl.artist.display_name, decl.artist.aliases)
    return _assemble(
        notice_id=notice_id(decl.publisher_id, decl.declaration_id),
        declaration_id=decl.declaration_id,
        publisher_id=decl.publisher_id,
        action=decl.action,
        artist=NoticeArtist(
            artist_ref=artist_ref(decl.publisher_id, decl.artist.artist_id),
            display_name=display,
            aliases=aliases,
            match_keys=keys,
            profiles=_urls(decl.artist.profiles),
            # contact_email: deliberately not copied.
        ),
        works=_works((w.url, w.sha256, w.title) for w in decl.works),
        all_works=decl.all_works,
        uses=decl.uses,
        declared_at=decl.declared_at,
        relayed_at=relayed_at,
        version=version,
        supersedes=decl.supersedes,
        note=decl.note,
    )


def renormalize(notice: Notice) -> Notice:
    """Apply the normalization rules again to a notice. For a notice that
    :func:`normalize` produced, the result equals the input (normalizing twice
    equals normalizing once). ``artist_ref``, ``notice_id``, ``version`` and ``ack``
    are kept: they cannot be derived from the notice itself."""
    display, aliases, keys = _names(notice.artist.display_name, notice.artist.aliases)
    return _assemble(
        notice_id=notice.notice_id,
        declaration_id=notice.declaration_id,
        publisher_id=notice.publisher_id,
        action=notice.action,
        artist=NoticeArtist(
            artist_ref=notice.artist.artist_ref,
            display_name=display,
            aliases=aliases,
            match_keys=keys,
            profiles=_urls(notice.artist.profiles),
        ),
        works=_works((w.url, w.sha256, w.title) for w in notice.works),
        all_works=notice.all_works,
        uses=notice.uses,
        declared_at=notice.declared_at,
        relayed_at=notice.relayed_at,
        version=notice.version,
        supersedes=notice.supersedes,
        note=notice.note,
        ack=notice.ack,
    )


__all__ = [
    "FINGERPRINT_EXCLUDES",
    "artist_ref",
    "fingerprint",
    "match_key",
    "normalize",
    "normalize_name",
    "notice_id",
    "renormalize",
]
