"""parse_declaration: whatever the bytes, a Declaration or DeclarationInvalid naming
the fields, with reasons a publisher can act on."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notice_relay.errors import DeclarationInvalid
from notice_relay.models import Declaration, FieldError
from notice_relay.normalize import normalize
from notice_relay.validate import (
    DOCUMENT,
    ECHO_LIMIT,
    MAX_BYTES,
    MAX_ERRORS,
    parse_declaration,
    validation_errors,
)

PUBLISHERS = frozenset({"artfolio", "pixelboard"})
DEVELOPERS = frozenset({"acme-ai", "brushstroke-labs", "canvas-research"})
FUZZ = settings(max_examples=200, deadline=None, database=None,
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


def artist(**overrides: Any) -> dict[str, Any]:
    """A valid artist object; keys overridable."""
    return {"artist_id": "u-1", "display_name": "Mara Quill", **overrides}


def encode(data: Any) -> bytes:
    """JSON bytes, as a publisher sends them."""
    return json.dumps(data, ensure_ascii=False).encode()


def reject(raw: bytes, **kw: Any) -> DeclarationInvalid:
    """Assert ``raw`` is refused; the exception, checked for the common contract:
    a one-line reason, and every error naming a field with a message."""
    with pytest.raises(DeclarationInvalid) as info:
        parse_declaration(raw, **kw)
    exc = info.value
    assert exc.reason
    assert "\n" not in exc.reason
    assert not exc.reason.startswith("could not be validated"), "an internal error, not a rule"
    assert exc.errors, "an invalid declaration names at least one field"
    assert all(e.field and e.message and "\n" not in e.message for e in exc.errors)
    return exc


def fields(exc: DeclarationInvalid) -> list[str]:
    """The fields an error names."""
    return [e.field for e in exc.errors]


def message(exc: DeclarationInvalid, field: str) -> str:
    """The message for one field."""
    return next(e.message for e in exc.errors if e.field == field)


def test_a_valid_declaration_is_returned() -> None:
    """Valid bytes give the Declaration, with its registry checks passed."""
    decl = parse_declaration(encode(declaration()), publishers=PUBLISHERS, developers=DEVELOPERS)
    assert isinstance(decl, Declaration)
    assert decl.declaration_key == "artfolio/af-0001"


# ------------------------------------------------------------------ bad bytes

_DEEP_ARRAYS = b"[" * 10_000 + b"]" * 10_000
_DEEP_OBJECTS = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
_DEEP_IN_FIELD = encode(declaration(note="X")).replace(b'"X"', b"[" * 5000 + b"]" * 5000)


@pytest.mark.parametrize("raw", [
    pytest.param(b"", id="empty"),
    pytest.param(b" \r\n\t ", id="whitespace"),
    pytest.param(b"\xef\xbb\xbf", id="bom-only"),
    pytest.param(b"not json", id="not-json"),
    pytest.param(b"{", id="truncated"),
    pytest.param(b'{"schema": }', id="syntax-error"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="true"),
    pytest.param(b"42", id="number"),
    pytest.param(b'"declaration"', id="string"),
    pytest.param(b"[]", id="array"),
    pytest.param(b"{}", id="empty-object"),
    pytest.param(b"\xff\xfe\xfd", id="not-utf8"),
    pytest.param(b"\xc3\x28", id="bad-continuation"),
    pytest.param(b'"\xed\xa0\x80"', id="utf8-encoded-surrogate"),
    pytest.param(b"\xc0\xaf", id="overlong"),
    pytest.param(b"\x00\x00\x00", id="nul-bytes"),
    pytest.param(json.dumps(declaration()).encode("utf-16"), id="utf-16-bom"),
    pytest.param(json.dumps(declaration()).encode("utf-16-le"), id="utf-16-no-bom"),
    pytest.param(json.dumps(declaration()).encode("utf-32"), id="utf-32"),
    pytest.param(_DEEP_ARRAYS, id="10000-deep-arrays"),
    pytest.param(_DEEP_OBJECTS, id="10000-deep-objects"),
    pytest.param(_DEEP_IN_FIELD, id="5000-deep-inside-a-field"),
    pytest.param(encode(declaration()) + b" trailing", id="trailing-garbage"),
    pytest.param(encode(declaration()) * 2, id="two-documents"),
    pytest.param(b'{"schema": NaN}', id="nan"),
    pytest.param(b'{"schema": 1e999999}', id="huge-number"),
    pytest.param(b'{"schema": ' + b"9" * 5000 + b"}", id="long-integer"),
    pytest.param(encode(declaration()).replace(b'"Mara Quill"', b'"\\ud800"'), id="lone-surrogate"),
    pytest.param(encode(declaration()).replace(b'"Mara Quill"', b'"a\\u0000b"'), id="escaped-nul"),
    pytest.param(b" " * (MAX_BYTES + 1), id="9MB-whitespace"),
    pytest.param(b"[" * (MAX_BYTES + 1), id="9MB-brackets"),
])
def test_bad_bytes_are_always_declaration_invalid(raw: bytes) -> None:
    """Whatever the bytes — empty, not UTF-8, UTF-16/32, not JSON, JSON but not an
    object, 10,000 levels deep, over 8 MB, lone surrogates, NUL — the result is
    DeclarationInvalid with a one-line reason and named fields, never another error."""
    reject(raw)


def test_empty_input_says_so() -> None:
    """Empty input is named as empty, on the document."""
    exc = reject(b"")
    assert "empty" in exc.reason
    assert fields(exc) == [DOCUMENT]


def test_invalid_utf8_names_the_byte_offset() -> None:
    """Bytes that are not UTF-8 are reported with the offset of the first bad byte."""
    raw = b'{"schema": "caf\xe9"}'
    exc = reject(raw)
    assert exc.reason.startswith("not valid UTF-8 at byte 15 (0xE9)")
    assert fields(exc) == [DOCUMENT]
    assert "at byte 18 " in reject(b"\xef\xbb\xbf" + raw).reason  # offsets count the BOM


def test_utf8_bom_is_accepted() -> None:
    """A UTF-8 byte order mark (as Windows tools write) is skipped, not refused."""
    decl = parse_declaration(b"\xef\xbb\xbf" + encode(declaration()))
    assert decl.declaration_id == "af-0001"


def test_utf16_is_refused_with_a_hint() -> None:
    """UTF-16 is refused with a reason that says the encoding must be UTF-8."""
    exc = reject(json.dumps(declaration()).encode("utf-16"))
    assert "UTF-8" in exc.reason


def test_not_json_says_where() -> None:
    """Syntax errors quote the parser's position."""
    exc = reject(b'{"schema": }')
    assert exc.reason.startswith("not valid JSON:")
    assert "line 1 column" in exc.reason


@pytest.mark.parametrize(("raw", "kind"), [
    (b"[1, 2]", "an array"), (b'"x"', "a string"), (b"3.5", "a number"),
    (b"null", "null"), (b"false", "false"),
])
def test_json_that_is_not_an_object(raw: bytes, kind: str) -> None:
    """JSON that is not an object is refused, saying what it is instead."""
    exc = reject(raw)
    assert exc.reason == f"expected a JSON object at the top level, got {kind}"


@pytest.mark.parametrize("raw", [_DEEP_ARRAYS, _DEEP_OBJECTS, _DEEP_IN_FIELD])
def test_deep_nesting_is_reported_as_such(raw: bytes) -> None:
    """Nesting past the parser's limit (about 200 levels) is named "nested too deeply",
    not an obscure "recursion limit exceeded"."""
    exc = reject(raw)
    assert exc.reason.startswith("JSON nested too deeply")
    assert fields(exc) == [DOCUMENT]


def test_oversized_input_is_refused_without_parsing() -> None:
    """Input over max_bytes is refused by its size alone (the reason gives the size
    and the limit), before any decoding or parsing: here it is not even JSON."""
    exc = reject(b"\xff" * 101, max_bytes=100)
    assert exc.reason == "declaration too large: 101 bytes; the limit is 100 bytes"
    nine_mb = b" " * (9 * 1024 * 1024)
    exc = reject(nine_mb)
    assert exc.reason == "declaration too large: 9,437,184 bytes; the limit is 8,388,608 bytes"


def test_input_at_the_limit_is_parsed() -> None:
    """Exactly max_bytes is allowed."""
    raw = encode(declaration())
    assert parse_declaration(raw, max_bytes=len(raw)).declaration_id == "af-0001"


def test_unexpected_failures_still_become_declaration_invalid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even a bug inside validation surfaces as DeclarationInvalid (so the stream goes
    on), with a reason that says it was unexpected."""
    import notice_relay.validate as validate

    def broken(text: str) -> list[FieldError]:
        raise KeyError("boom")

    monkeypatch.setattr(validate, "_duplicate_keys", broken)
    with pytest.raises(DeclarationInvalid) as info:
        parse_declaration(encode(declaration()))
    assert info.value.reason == "could not be validated: unexpected KeyError"
    assert info.value.errors[0].field == DOCUMENT


def test_non_bytes_input_is_refused() -> None:
    """A str (or anything not bytes-like) is DeclarationInvalid too, not TypeError."""
    exc = reject(json.dumps(declaration()))  # type: ignore[arg-type]
    assert exc.reason == "expected bytes, got str"
    raw = bytearray(encode(declaration()))
    assert parse_declaration(raw).declaration_id == "af-0001"  # type: ignore[arg-type]


# ------------------------------------------------------------------ contract


def test_unsupported_schema_is_one_clear_reason() -> None:
    """Another schema value is refused with one reason naming it and the accepted one;
    the rest of the document is not checked against v1's rules."""
    exc = reject(encode({"schema": "notice-relay/declaration/v9", "whatever": 1}))
    assert exc.reason == (
        "unsupported schema \"notice-relay/declaration/v9\"; "
        "this relay accepts notice-relay/declaration/v1"
    )
    assert fields(exc) == ["schema"]


def test_missing_schema_is_a_missing_field() -> None:
    """A document without schema reports the field as missing."""
    data = declaration()
    del data["schema"]
    exc = reject(encode(data))
    assert message(exc, "schema") == "required field is missing"


def test_unknown_fields_are_named_with_a_suggestion() -> None:
    """Unknown fields are errors, named by their path, with the nearest known field
    suggested (at the same level or elsewhere)."""
    exc = reject(encode(declaration(all_work=True, artist=artist(all_work=True, aliass=["m"]))))
    assert message(exc, "all_work") == "unknown field (did you mean 'all_works'?)"
    assert message(exc, "artist.all_work") == (
        "unknown field (did you mean 'all_works', a top-level field?)")
    assert message(exc, "artist.aliass") == "unknown field (did you mean 'aliases'?)"
    exc = reject(encode(declaration(works=[{"url": "https://a.example/", "titel": "x"}])))
    assert message(exc, "works.0.titel") == "unknown field (did you mean 'title'?)"
    exc = reject(encode(declaration(colour="blue")))
    assert message(exc, "colour") == "unknown field"


def test_reason_summarizes_several_fields() -> None:
    """With several errors, the reason counts them and lists their fields."""
    exc = reject(encode(declaration(
        artist=artist(display_name=""), works=[{"url": "javascript:alert(1)"}], uses=[])))
    assert exc.reason == "3 invalid fields: artist.display_name, works.0.url, uses"


def test_reason_for_one_field_carries_its_message() -> None:
    """With one error, the reason gives the field and the message."""
    exc = reject(encode(declaration(works=[{"url": "ftp://a.example/"}])))
    assert exc.reason == "1 invalid field: works.0.url: must be an http(s) URL, not 'ftp' URL"


@pytest.mark.parametrize(("override", "field", "expected"), [
    ({"all_works": "yes"}, "all_works", 'must be true or false, got "yes"'),
    ({"all_works": 1}, "all_works", "must be true or false, got a number"),
    ({"uses": "train-ai"}, "uses", 'must be a JSON array, got "train-ai"'),
    ({"targets": "*"}, "targets", 'must be a JSON array, got "*" (use ["*"] for every developer)'),
    ({"artist": "Mara"}, "artist", 'must be a JSON object, got "Mara"'),
    ({"works": [42]}, "works.0", "must be a JSON object, got a number"),
    ({"declaration_id": 7}, "declaration_id", "must be a string, got a number"),
    ({"declaration_id": "a b"}, "declaration_id",
     'must be 1-128 characters of A-Z a-z 0-9 . _ : -, got "a b"'),
    ({"action": "opt-out"}, "action", "Input should be 'opt_out' or 'withdraw', got \"opt-out\""),
    ({"uses": ["train-ai", "train-all"]}, "uses.1",
     'unknown use "train-all"; expected one of: train-ai, train-genai, data-mining, '
     "ai-inference, prompt-name"),
    ({"uses": []}, "uses",
     "must list at least one use: train-ai, train-genai, data-mining, ai-inference, prompt-name"),
    ({"targets": []}, "targets",
     'must list at least one developer id, or ["*"] for every developer'),
    ({"targets": ["*", "acme-ai"]}, "targets",
     '"*" (every developer) cannot be combined with developer ids'),
    ({"targets": ["acme ai"]}, "targets.0",
     'must be "*" or a developer id (1-128 characters of A-Z a-z 0-9 . _ : -), got "acme ai"'),
    ({"works": [{"url": "https://a.example/", "sha256": "abc"}]}, "works.0.sha256",
     'must be a SHA-256 digest: 64 hexadecimal characters, got "abc"'),
    ({"works": [{"url": "https://a.example/", "title": ""}]}, "works.0.title", "must not be empty"),
    ({"artist": artist(display_name="x" * 201)}, "artist.display_name",
     "must be at most 200 characters (got 201)"),
    ({"artist": artist(display_name="   ")}, "artist.display_name", "must not be blank"),
    ({"artist": artist(display_name="a\u202eb")}, "artist.display_name",
     "contains the control character U+202E"),
    ({"note": "x" * 2001}, "note", "must be at most 2,000 characters (got 2,001)"),
    ({"declared_at": "yesterday"}, "declared_at",
     "must be an RFC 3339 timestamp with offset, e.g. 2026-03-01T12:00:00+09:00 "
     '(input is too short), got "yesterday"'),
    ({"declared_at": 1767225600}, "declared_at",
     "must be an RFC 3339 timestamp with offset, e.g. 2026-03-01T12:00:00+09:00, got a number"),
])
def test_wrong_values_get_actionable_messages(
    override: dict[str, Any], field: str, expected: str
) -> None:
    """Wrong types and values are reported on their dotted path with a message that
    says what is expected (and, shortened, what was sent)."""
    exc = reject(encode(declaration(**override)))
    assert message(exc, field) == expected


def test_naive_timestamp_is_refused() -> None:
    """declared_at without an offset is refused: the instant would be ambiguous."""
    exc = reject(encode(declaration(declared_at="2026-03-01T12:00:00")))
    assert fields(exc) == ["declared_at"]
    assert message(exc, "declared_at").startswith("must include a UTC offset")


def test_future_timestamp_rule() -> None:
    """declared_at may be up to 5 minutes ahead (clock skew), not more."""
    soon = datetime.now(UTC) + timedelta(minutes=4)
    parse_declaration(encode(declaration(declared_at=soon.isoformat())))
    later = datetime.now(UTC) + timedelta(minutes=6)
    exc = reject(encode(declaration(declared_at=later.isoformat())))
    assert message(exc, "declared_at") == "is more than 5 minutes in the future"
    exc = reject(encode(declaration(declared_at="2099-01-01T00:00:00Z")))
    assert fields(exc) == ["declared_at"]


def test_any_offset_is_accepted() -> None:
    """Offsets other than UTC, and "Z", are fine."""
    for when in ("2026-03-01T12:00:00Z", "2026-03-01T12:00:00-09:30",
                 "2026-03-01T12:00:00.5+14:00"):
        parse_declaration(encode(declaration(declared_at=when)))


def test_withdraw_needs_supersedes_and_only_withdraw_has_it() -> None:
    """A withdrawal must say what it supersedes; an opt-out must not; nothing
    supersedes itself. The model-level errors land on the supersedes field."""
    exc = reject(encode(declaration(action="withdraw")))
    assert exc.errors == [
        FieldError(field="supersedes", message="required when action is withdraw")]
    exc = reject(encode(declaration(supersedes="af-0000")))
    assert message(exc, "supersedes") == "only allowed when action is withdraw"
    exc = reject(encode(declaration(action="withdraw", supersedes="af-0001")))
    assert message(exc, "supersedes") == "a declaration cannot supersede itself"
    parse_declaration(encode(declaration(action="withdraw", supersedes="af-0000")))


def test_works_required_unless_all_works() -> None:
    """No works is only allowed with all_works: true."""
    exc = reject(encode(declaration(works=[])))
    assert exc.errors == [FieldError(
        field="works", message="must list at least one work unless all_works is true")]
    parse_declaration(encode(declaration(works=[], all_works=True)))


def test_10000_works_accepted_10001_refused() -> None:
    """The works limit is 10,000: the 10,001st is refused on works, saying the count."""
    works = [{"url": f"https://a.example/w/{i}"} for i in range(10_000)]
    parse_declaration(encode(declaration(works=works)))
    exc = reject(encode(declaration(works=[*works, {"url": "https://a.example/w/x"}])))
    assert exc.errors == [
        FieldError(field="works", message="must have at most 10,000 items (got 10,001)")]


@pytest.mark.parametrize("url", [
    "javascript:alert(document.cookie)", "JAVASCRIPT:alert(1)", " javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>", "data:image/png;base64,iVBORw0KGgo=",
    "file:///etc/passwd", "file://server/share/a.png", "vbscript:x", "ftp://a.example/",
    "blob:https://a.example/1", "about:blank", "//a.example/x", "a.example/x",
])
def test_non_http_urls_are_refused_in_works_and_profiles(url: str) -> None:
    """javascript:, data:, file: and every other non-http(s) or relative URL is refused,
    in works and in profiles, on the URL's own path."""
    exc = reject(encode(declaration(works=[{"url": url}],
                                    artist=artist(profiles=["https://x.com/a", url]))))
    assert set(fields(exc)) == {"works.0.url", "artist.profiles.1"}


def test_duplicate_keys_are_refused() -> None:
    """A key twice in one object is refused on its path (parsers disagree on which
    value wins)."""
    raw = encode(declaration()).replace(b'"uses": ["train-ai"]',
                                        b'"uses": ["train-ai"], "uses": ["data-mining"]')
    exc = reject(raw)
    assert fields(exc) == ["uses"]
    raw = encode(declaration()).replace(b'"artist_id": "u-1"',
                                        b'"artist_id": "u-1", "artist_id": "u-2"')
    assert fields(reject(raw)) == ["artist.artist_id"]


def test_invisible_display_name_is_refused() -> None:
    """A display name made only of invisible characters is refused here, so that
    normalize never meets one."""
    exc = reject(encode(declaration(artist=artist(display_name="\u200b\u2060"))))
    assert fields(exc) == ["artist.display_name"]


# ------------------------------------------------------------------ registry


def test_unknown_publisher_and_developers_are_errors_on_their_fields() -> None:
    """With a registry, an unknown publisher_id is an error on publisher_id and each
    unknown target on targets.N; without one, ids are not checked."""
    data = encode(declaration(publisher_id="sketchhub",
                              targets=["acme-ai", "pixel-forge-ai", "nobody"]))
    exc = reject(data, publishers=PUBLISHERS, developers=DEVELOPERS)
    assert fields(exc) == ["publisher_id", "targets.1", "targets.2"]
    assert message(exc, "targets.1").startswith('unknown developer "pixel-forge-ai"')
    assert exc.reason == "3 invalid fields: publisher_id, targets.1, targets.2"
    parse_declaration(data)


def test_star_target_needs_no_registered_developer() -> None:
    """"*" is every registered developer, even when none is registered."""
    parse_declaration(encode(declaration()), developers=frozenset())


# ------------------------------------------------------------ what messages echo


def test_contact_email_is_never_echoed() -> None:
    """Whatever is wrong with the contact email, no message or reason quotes it."""
    for bad in ("SECRET-ADDRESS", "SECRET@@example.invalid", "SECRET" * 100 + "@example.invalid"):
        exc = reject(encode(declaration(artist=artist(contact_email=bad))))
        assert fields(exc) == ["artist.contact_email"]
        assert "SECRET" not in exc.reason + json.dumps([e.model_dump() for e in exc.errors])
    exc = reject(encode(declaration(artist=artist(contact_email=["SECRET@example.invalid"]))))
    assert "SECRET" not in exc.reason + message(exc, "artist.contact_email")


def test_reserved_email_domains_are_accepted() -> None:
    """example.invalid and other reserved names are valid contact emails: the relay
    never mails the address, and examples and tests must use reserved names."""
    for email in ("mara@example.invalid", "kei@studio.test", "山田@例え.jp"):
        parse_declaration(encode(declaration(artist=artist(contact_email=email))))


def test_long_values_are_shortened_in_messages() -> None:
    """Echoed input is cut to about 80 characters, however long it was."""
    exc = reject(encode(declaration(uses=["x" * 100_000], declaration_id="y" * 100_000,
                                    **{"z" * 10_000: 1})))
    for error in exc.errors:
        assert len(error.message) < 300
        assert len(error.field) < 120
    assert "…" in message(exc, "uses.0")
    assert any(e.field.startswith('"zzz') and e.field.endswith('…"') for e in exc.errors)
    exc = reject(encode(declaration(**{"": 1, "a.b": 2})))
    assert fields(exc) == ['""', '"a.b"']
    assert len(exc.reason) < 600
    assert ECHO_LIMIT == 80


def test_many_errors_are_capped_but_counted() -> None:
    """Thousands of bad works give at most MAX_ERRORS FieldErrors; the reason counts
    them all."""
    works = [{"url": f"ftp://a.example/{i}"} for i in range(2_500)]
    exc = reject(encode(declaration(works=works)))
    assert len(exc.errors) == MAX_ERRORS
    assert exc.reason.startswith("2,500 invalid fields: works.0.url, works.1.url,")
    assert exc.reason.endswith("and 2,490 more")


# ------------------------------------------------------------ validation_errors


def test_validation_errors_translates_pydantic_errors() -> None:
    """validation_errors turns a pydantic ValidationError into FieldErrors: dotted
    paths, union tags dropped, model-level "<field>: …" messages split onto the field."""
    bad = declaration(action="withdraw", targets=[5],
                      works=[{"url": "https://a.example/"}, {"url": "data:,x"}])
    with pytest.raises(pydantic.ValidationError) as info:
        Declaration.model_validate_json(json.dumps(bad))
    errors = validation_errors(info.value)
    assert [e.field for e in errors] == ["works.1.url", "targets.0"]
    with pytest.raises(pydantic.ValidationError) as info:
        Declaration.model_validate_json(json.dumps(declaration(action="withdraw")))
    assert validation_errors(info.value) == [
        FieldError(field="supersedes", message="required when action is withdraw")]


# ------------------------------------------------------------------ fuzzing

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20,
)
def _outcome(raw: bytes) -> Declaration | DeclarationInvalid:
    """The declaration, or the refusal, without raising."""
    try:
        return parse_declaration(raw)
    except DeclarationInvalid as exc:
        return exc


def _check_refusal(exc: DeclarationInvalid) -> None:
    """The contract of every refusal: named fields, a one-line reason, a rule."""
    assert exc.errors
    assert all(e.field and e.message for e in exc.errors)
    assert "\n" not in exc.reason
    assert not exc.reason.startswith("could not be validated")


_FIELDS = ["schema", "declaration_id", "publisher_id", "action", "declared_at", "artist",
           "works", "all_works", "uses", "targets", "supersedes", "note"]


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    """Arbitrary bytes: DeclarationInvalid or a Declaration, nothing else."""
    outcome = _outcome(raw)
    if isinstance(outcome, DeclarationInvalid):
        _check_refusal(outcome)


@FUZZ
@given(_JSON)
def test_fuzz_arbitrary_json(value: Any) -> None:
    """Arbitrary JSON values: always DeclarationInvalid with named fields."""
    reject(encode(value))


@FUZZ
@given(st.sampled_from(_FIELDS), _JSON, st.sampled_from(["artist_id", "display_name",
                                                         "aliases", "profiles", "contact_email"]),
       _JSON)
def test_fuzz_mutated_declarations(field: str, value: Any, artist_field: str, inner: Any) -> None:
    """A valid declaration with a field (top-level or in artist) replaced by arbitrary
    JSON is either refused with named fields, or accepted and then normalizes: an
    accepted declaration never breaks the next stage."""
    data = declaration(artist=artist(**{artist_field: inner}))
    data[field] = value
    outcome = _outcome(encode(data))
    if isinstance(outcome, DeclarationInvalid):
        _check_refusal(outcome)
    else:
        normalize(outcome, relayed_at=datetime.now(UTC))
