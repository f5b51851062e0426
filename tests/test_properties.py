"""Property tests of the parser and the normalizer (hypothesis).

What the example-based tests cannot show: for *any* input the parser answers with a
Declaration or a DeclarationInvalid that names fields — never another exception, and
never its own "could not be validated" fallback, which would mean a rule crashed;
valid declarations built from the contract's rules (any Unicode a name may hold, any
identifier, any offset) are always accepted, however the JSON is written, and agree
with the published JSON Schema; normalization is deterministic, idempotent, keeps the
contact email out, and its notices agree with the Notice v1 schema.

Example counts are moderate so that the module runs in well under a minute.
"""

from __future__ import annotations

import copy
import json
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notice_relay.errors import DeclarationInvalid
from notice_relay.models import Declaration, Notice, Use
from notice_relay.normalize import (
    fingerprint,
    match_key,
    normalize,
    normalize_name,
    renormalize,
)
from notice_relay.urls import check_http_url, normalize_url
from notice_relay.validate import parse_declaration

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus" / "bad"
DECLARATION_SCHEMA = json.loads((ROOT / "schemas" / "declaration.v1.json").read_text())
NOTICE_SCHEMA = json.loads((ROOT / "schemas" / "notice.v1.json").read_text())
PUBLISHERS = frozenset({"artfolio", "pixelboard"})
DEVELOPERS = frozenset({"acme-ai", "brushstroke-labs"})
EMAIL = "mara.quill@example.invalid"
RELAYED = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

SOME = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FEW = settings(max_examples=40, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"

# ----------------------------------------------------------------- strategies

#: Characters a name may hold: anything but controls (Cc), surrogates and the bidi
#: controls. Invisible ones (ZWSP, soft hyphen…) are allowed inside a name.
_NAME_CHAR = st.characters(exclude_categories=("Cc", "Cs"), exclude_characters=_BIDI)
_NAMES = st.text(_NAME_CHAR, min_size=1, max_size=200).filter(
    lambda s: bool(s.strip()) and bool(normalize_name(s)))
_NOTE = st.text(st.one_of(_NAME_CHAR, st.sampled_from("\n\t")), max_size=2000)
_IDS = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
_HOST_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_HOSTS = st.one_of(
    st.lists(_HOST_LABEL, min_size=2, max_size=4).map(".".join),
    st.sampled_from(["www.pixiv.net", "pixiv.net", "x.com", "mobile.twitter.com",
                     "www.artstation.com", "deviantart.com", "m.instagram.com",
                     "bücher.example", "例え.jp", "пример.рф", "ÖBB.at", "192.0.2.7",
                     "[2001:db8::1]", "EXAMPLE.com."]),
)
_PATH_CHARS = st.sampled_from([
    *"abcXYZ019-._~!$&'()*+,;=:@", "%20", "%7E", "%2F", "%", "é", "絵", "/", "/./", "/../",
])
_PATHS = st.lists(_PATH_CHARS, max_size=15).map(lambda parts: "/" + "".join(parts))
_QUERIES = st.lists(
    st.one_of(st.from_regex(r"[a-z]{1,6}=[a-zA-Z0-9%]{0,6}", fullmatch=True),
              st.sampled_from(["utm_source=x", "fbclid=1", "igsh=2", "s=20", "t=abc"])),
    max_size=4,
).map(lambda ps: "?" + "&".join(ps) if ps else "")
_URLS = st.builds(
    "{}://{}{}{}{}{}".format,
    st.sampled_from(["http", "https", "HTTP", "hTTpS"]),
    _HOSTS,
    st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    _PATHS,
    _QUERIES,
    st.sampled_from(["", "#", "#frag", "#a/b?c"]),
)
_SHA = st.text("0123456789abcdefABCDEF", min_size=64, max_size=64)
_WHEN = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2026, 1, 1))
_OFFSET = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
_USES = st.lists(st.sampled_from([u.value for u in Use]), min_size=1, max_size=6)
_TARGETS = st.one_of(st.just("*").map(lambda star: [star]),
                     st.lists(st.sampled_from(sorted(DEVELOPERS)), min_size=1, max_size=3))


@st.composite
def valid_declarations(draw: st.DrawFn) -> dict[str, Any]:
    """A declaration that keeps every rule of the contract, as JSON data."""
    works = draw(st.lists(st.fixed_dictionaries(
        {"url": _URLS}, optional={"sha256": _SHA, "title": _NAMES.filter(lambda s: len(s) <= 500)}
    ), max_size=8))
    decl_id = draw(_IDS)
    action = draw(st.sampled_from(["opt_out", "withdraw"]))
    data: dict[str, Any] = {
        "schema": "notice-relay/declaration/v1",
        "declaration_id": decl_id,
        "publisher_id": draw(st.sampled_from(sorted(PUBLISHERS))),
        "action": action,
        "declared_at": draw(_WHEN).replace(tzinfo=draw(_OFFSET)).isoformat(),
        "artist": draw(st.fixed_dictionaries(
            {"artist_id": st.text(_NAME_CHAR, min_size=1, max_size=256).filter(str.strip),
             "display_name": _NAMES},
            optional={"aliases": st.lists(_NAMES, max_size=8),
                      "profiles": st.lists(_URLS, max_size=8),
                      "contact_email": st.just(EMAIL)})),
        "uses": draw(_USES),
        "targets": draw(_TARGETS),
    }
    if works or draw(st.booleans()):
        data["works"] = works
    all_works = draw(st.booleans()) or not works
    if all_works or draw(st.booleans()):
        data["all_works"] = all_works
    if action == "withdraw":
        data["supersedes"] = draw(_IDS.filter(lambda s: s != decl_id))
    if draw(st.booleans()):
        data["note"] = draw(_NOTE)
    return data


def _dump(data: Any, style: int) -> bytes:
    """The same JSON written four ways: compact, indented, sorted, ASCII-escaped."""
    if style == 0:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    if style == 1:
        return json.dumps(data, ensure_ascii=False, indent=4).encode()
    if style == 2:
        return json.dumps(data, ensure_ascii=False, sort_keys=True).encode()
    return b"\xef\xbb\xbf" + json.dumps(data, ensure_ascii=True).encode()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=15,
)


def _outcome(raw: bytes, **registry: Any) -> Declaration | DeclarationInvalid:
    """parse_declaration's answer; any other exception fails the test by propagating."""
    try:
        return parse_declaration(raw, **registry)
    except DeclarationInvalid as exc:
        return exc


def _check_refusal(exc: DeclarationInvalid) -> None:
    """Every refusal names fields, in one line, and comes from a rule, not a crash."""
    assert exc.errors
    assert all(e.field and e.message for e in exc.errors)
    assert "\n" not in exc.reason
    assert not exc.reason.startswith("could not be validated"), exc.reason


# ------------------------------------------------------------ anything in, a rule out


@SOME
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_refused_by_a_rule(raw: bytes) -> None:
    """Random bytes: a DeclarationInvalid from a rule (never the crash fallback)."""
    outcome = _outcome(raw)
    assert isinstance(outcome, DeclarationInvalid)
    _check_refusal(outcome)


@SOME
@given(_JSON)
def test_arbitrary_json_is_refused_by_a_rule(value: Any) -> None:
    """Any JSON value: refused, by a rule, naming fields."""
    for style in range(4):
        outcome = _outcome(_dump(value, style))
        assert isinstance(outcome, DeclarationInvalid)
        _check_refusal(outcome)


_SEEDS = sorted(p for p in CORPUS.iterdir() if p.suffix in (".json", ".bin"))


@SOME
@given(st.sampled_from(_SEEDS), st.data())
def test_byte_mutations_of_real_documents(seed: Path, data: st.DataObject) -> None:
    """Bytes flipped, cut, inserted or spliced in real (bad and almost-good)
    documents — inputs that get past the JSON parser far more often than random
    bytes: a Declaration that normalizes, or a refusal by a rule."""
    raw = bytearray(seed.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = data.draw(st.sampled_from(
                [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\\u0000", b"\xc3",
                 b"\xff", b"\x00", b"null", b"1e999", b"-0", b'"x":1,', b"\r\n"]))
        elif raw:
            del raw[at : at + data.draw(st.integers(1, 20))]
    outcome = _outcome(bytes(raw), publishers=PUBLISHERS, developers=DEVELOPERS)
    if isinstance(outcome, DeclarationInvalid):
        _check_refusal(outcome)
    else:
        normalize(outcome, relayed_at=RELAYED)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _paths(v, (*prefix, i))
    return found


@SOME
@given(valid_declarations(), st.data())
def test_structural_mutations_anywhere(decl: dict[str, Any], data: st.DataObject) -> None:
    """A valid declaration changed at any depth — a value replaced by any JSON, a key
    removed, an unknown key added: accepted and normalizable, or refused by a rule
    naming a field at or above the change (or the document, or the field a rule
    across fields requires)."""
    decl = copy.deepcopy(decl)
    path = data.draw(st.sampled_from(_paths(decl)[1:]))
    *head, last = path
    parent: Any = decl
    for part in head:
        parent = parent[part]
    op = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if op == "replace":
        parent[last] = data.draw(_JSON)
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in parent))] = 1
    else:
        parent.append(data.draw(_JSON))
    outcome = _outcome(_dump(decl, data.draw(st.integers(0, 3))),
                       publishers=PUBLISHERS, developers=DEVELOPERS)
    if isinstance(outcome, DeclarationInvalid):
        _check_refusal(outcome)
        if op == "add" and isinstance(parent, dict):
            return  # the added key is named (quoted or not) under its parent
        top = {e.field.split(".")[0] for e in outcome.errors}
        # The rules across fields (withdraw needs supersedes, no works needs
        # all_works) name the field that is missing, not the one that changed.
        assert top & {str(path[0]), "$", "supersedes", "works"} or op == "delete", (
            path, outcome.errors)
    else:
        normalize(outcome, relayed_at=RELAYED)


@FEW
@given(st.sampled_from(_SEEDS))
def test_refusals_are_deterministic(seed: Path) -> None:
    """The same bad bytes are refused with the same reason and errors every time (the
    rejection's audit event id and the publisher's view depend on it)."""
    raw = seed.read_bytes()
    first = _outcome(raw, publishers=PUBLISHERS, developers=DEVELOPERS)
    second = _outcome(raw, publishers=PUBLISHERS, developers=DEVELOPERS)
    assert isinstance(first, DeclarationInvalid)
    assert isinstance(second, DeclarationInvalid)
    assert (first.reason, first.errors) == (second.reason, second.errors)


# --------------------------------------------------------------- valid always parses


@SOME
@given(valid_declarations(), st.integers(0, 3))
def test_valid_declarations_always_parse(decl: dict[str, Any], style: int) -> None:
    """Built from the contract's rules, written any way: accepted with the registry,
    equal to the declaration written compactly, and valid against the published
    JSON Schema (the schema and the parser agree on what is valid)."""
    raw = _dump(decl, style)
    parsed = parse_declaration(raw, publishers=PUBLISHERS, developers=DEVELOPERS)
    assert parsed == parse_declaration(_dump(decl, 0))
    assert parsed.declaration_id == decl["declaration_id"]
    assert parsed.artist.display_name == decl["artist"]["display_name"]
    jsonschema.validate(decl, DECLARATION_SCHEMA,
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@FEW
@given(valid_declarations(), st.sampled_from(["skynet-labs", "ACME-AI", "acme-ai2"]))
def test_unknown_targets_are_named_by_position(decl: dict[str, Any], unknown: str) -> None:
    """A developer id missing from the registry is refused on exactly its position."""
    targets = [t for t in decl["targets"] if t != "*"] or ["acme-ai"]
    position = len(targets)
    decl["targets"] = [*targets, unknown]
    outcome = _outcome(_dump(decl, 0), publishers=PUBLISHERS, developers=DEVELOPERS)
    assert isinstance(outcome, DeclarationInvalid)
    assert [e.field for e in outcome.errors] == [f"targets.{position}"]


# ------------------------------------------------------------------- normalization


@SOME
@given(valid_declarations())
def test_normalize_is_deterministic_idempotent_and_keeps_the_email_out(
    decl: dict[str, Any],
) -> None:
    """normalize twice gives equal notices; renormalize changes nothing; the
    fingerprint is the content's and ignores the relay time and version; the notice
    survives a JSON round trip, matches schemas/notice.v1.json, and never carries the
    contact email."""
    parsed = parse_declaration(_dump(decl, 0))
    notice = normalize(parsed, relayed_at=RELAYED)
    assert normalize(parsed, relayed_at=RELAYED) == notice
    assert renormalize(notice) == notice
    assert renormalize(notice).model_dump_json() == notice.model_dump_json()
    assert notice.fingerprint == fingerprint(notice)
    later = normalize(parsed, relayed_at=RELAYED + timedelta(days=3), version=7)
    assert later.fingerprint == notice.fingerprint
    text = notice.model_dump_json()
    assert Notice.model_validate_json(text) == notice
    jsonschema.validate(json.loads(text), NOTICE_SCHEMA)
    assert EMAIL not in text
    assert notice.declared_at.utcoffset() == timedelta(0)
    # Every URL in the notice is one the parser accepts and already normal.
    for url in [*notice.artist.profiles, *(w.url for w in notice.works)]:
        assert check_http_url(url) == url
        assert normalize_url(url) == url
    assert len({w.url for w in notice.works}) == len(notice.works)


@SOME
@given(_URLS)
def test_generated_urls_are_accepted_and_normalize_to_a_fixed_point(url: str) -> None:
    """Absolute http(s) URLs built from the rules are accepted; normalizing them is
    idempotent, keeps them acceptable, lower-cases the scheme and drops fragments."""
    assert check_http_url(url) == url
    once = normalize_url(url)
    assert normalize_url(once) == once
    assert check_http_url(once) == once
    assert once.startswith(("http://", "https://"))
    assert "#" not in once
    assert "utm_source" not in once


@SOME
@given(st.text(max_size=60))
def test_name_normalization_is_idempotent_and_clean(text: str) -> None:
    """For any text (controls and surrogates included): normalize_name and match_key
    are fixed points after one application, and what they return has no control
    characters, no bidi controls and no surrounding or doubled whitespace."""
    name = normalize_name(text)
    key = match_key(text)
    assert normalize_name(name) == name
    assert match_key(key) == key
    assert match_key(name) == key
    for out in (name, key):
        assert not any(unicodedata.category(c) in ("Cc", "Cs") or c in _BIDI for c in out)
        assert out == " ".join(out.split())


@pytest.mark.parametrize("style", range(4))
def test_the_json_spellings_are_equivalent(style: int) -> None:
    """The four spellings _dump produces really differ (so the properties above
    exercise more than one) and all carry the same declaration."""
    decl = {"schema": "notice-relay/declaration/v1", "declaration_id": "p-1",
            "publisher_id": "artfolio", "action": "opt_out",
            "declared_at": "2026-03-01T12:00:00+09:00",
            "artist": {"artist_id": "a", "display_name": "花子 Quill"},
            "all_works": True, "uses": ["train-ai"], "targets": ["*"]}
    spellings = {_dump(decl, s) for s in range(4)}
    assert len(spellings) == 4
    assert parse_declaration(_dump(decl, style)) == parse_declaration(_dump(decl, 0))
