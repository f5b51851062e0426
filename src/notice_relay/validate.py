"""Turning raw bytes into a Declaration, or into reasons a publisher can act on.

:func:`parse_declaration` is the one gate: whatever the bytes, it returns a
:class:`~notice_relay.models.Declaration` that :func:`notice_relay.normalize.normalize`
accepts, or raises :class:`~notice_relay.errors.DeclarationInvalid` naming each
offending field. It never raises anything else, so a bad message can never stop the
stream that carries it.

Field names are dotted paths into the declaration (``works.3.url``,
``artist.display_name``); ``$`` names the document as a whole (not UTF-8, not JSON,
too large, …).

Decisions:

- A UTF-8 byte order mark is accepted and skipped. RFC 8259 lets parsers ignore it,
  common Windows tools write it, and refusing a declaration over an invisible byte
  that carries no meaning would only bounce artists' opt-outs. UTF-16 and UTF-32
  (with or without a BOM) are refused: declarations are UTF-8.
- A key that appears twice in one JSON object is refused: parsers disagree about
  which value wins, and a declaration must mean one thing to every reader.
- A document whose ``schema`` names another version is refused with that one reason:
  checking it against v1's rules would only produce noise.
- ``declared_at`` must be written as RFC 3339 requires (``2026-03-01T12:00:00+09:00``,
  ``…Z``). pydantic alone would also read a Unix time in a string, ``+0900`` and times
  without seconds; what the contract says is what every publisher's parser reads.
- Messages never echo the contact email, and echo other input only up to
  :data:`ECHO_LIMIT` characters.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Collection, Sequence
from typing import Any

import pydantic
from pydantic_core import ErrorDetails

from notice_relay.errors import DeclarationInvalid
from notice_relay.models import DECLARATION_SCHEMA_V1, Artist, Declaration, FieldError, Use, Work
from notice_relay.normalize import normalize_name

MAX_BYTES = 8 * 1024 * 1024
#: The field name of errors about the document as a whole.
DOCUMENT = "$"
#: How much of an offending value a message may quote.
ECHO_LIMIT = 80
#: At most this many FieldErrors are kept (the reason still counts them all), so
#: that a declaration with 10,000 bad works yields a rejection of sensible size.
MAX_ERRORS = 100
_MAX_MESSAGE = 300
_REASON_FIELDS = 10

# Values that must never appear in a message: the field is personal data.
_PII_FIELDS = frozenset({"contact_email"})
_IDENTIFIER_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
_ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ : -"
_TIMESTAMP_EXAMPLE = "2026-03-01T12:00:00+09:00"
# RFC 3339 section 5.6 date-time ("T" or, as its note allows, a space; any case).
_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): (.+)$", re.DOTALL)
_UTF8_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = (b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00", b"\xfe\xff", b"\xff\xfe")


def parse_declaration(
    raw: bytes,
    *,
    publishers: Collection[str] | None = None,
    developers: Collection[str] | None = None,
    max_bytes: int = MAX_BYTES,
) -> Declaration:
    """Parse and validate one Declaration v1 from ``raw`` JSON bytes.

    ``publishers`` and ``developers``, when given, are the registered ids: an
    unknown ``publisher_id`` is an error on ``publisher_id`` and an unknown target an
    error on ``targets.N``. Input larger than ``max_bytes`` is refused unparsed.

    Raises DeclarationInvalid, and only DeclarationInvalid, for any bad input.
    """
    try:
        return _parse(raw, publishers, developers, max_bytes)
    except DeclarationInvalid:
        raise
    except Exception as exc:
        # The contract is that nothing else escapes, whatever the bytes: an
        # unforeseen failure still becomes a rejection the operator can see.
        reason = f"could not be validated: unexpected {type(exc).__name__}"
        raise DeclarationInvalid(reason, [FieldError(field=DOCUMENT, message=reason)]) from exc


def _document_error(reason: str) -> DeclarationInvalid:
    return DeclarationInvalid(reason, [FieldError(field=DOCUMENT, message=reason)])


def _decode(raw: bytes, max_bytes: int) -> str:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise _document_error(f"expected bytes, got {type(raw).__name__}")
    size = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    if size > max_bytes:
        # Refused by size alone: nothing this large is decoded or parsed.
        raise _document_error(
            f"declaration too large: {size:,} bytes; the limit is {max_bytes:,} bytes"
        )
    data = bytes(raw)
    if not data:
        raise _document_error("declaration is empty (0 bytes); expected a JSON object")
    offset = 0
    if data.startswith(_UTF8_BOM):
        data, offset = data[len(_UTF8_BOM) :], len(_UTF8_BOM)
    elif data.startswith(_WIDE_BOMS) or b"\x00" in data[:4]:
        raise _document_error("declaration looks like UTF-16 or UTF-32; it must be UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where, bad = exc.start + offset, data[exc.start]
        raise _document_error(
            f"not valid UTF-8 at byte {where} (0x{bad:02X}); declarations must be UTF-8"
        ) from None
    if not text.strip():
        raise _document_error("declaration is empty (only whitespace); expected a JSON object")
    return text


def _parse(
    raw: bytes,
    publishers: Collection[str] | None,
    developers: Collection[str] | None,
    max_bytes: int,
) -> Declaration:
    text = _decode(raw, max_bytes)
    try:
        decl = Declaration.model_validate_json(text)
    except pydantic.ValidationError as exc:
        raise _invalid(exc, text) from None
    doc = json.loads(text, object_pairs_hook=_object)
    errors = _duplicate_keys(doc)
    stamp = doc.get("declared_at")
    if isinstance(stamp, str) and not _RFC3339.match(stamp):
        # pydantic also reads Unix times ("1772334000"), "+0900" and times without
        # seconds; the contract is RFC 3339.
        errors.append(FieldError(
            field="declared_at",
            message=f"must be an RFC 3339 timestamp with offset, e.g. {_TIMESTAMP_EXAMPLE}, "
            f"got {_echo(stamp)}",
        ))
    if not normalize_name(decl.artist.display_name):
        errors.append(FieldError(
            field="artist.display_name",
            message="contains only invisible or control characters; it must show a name",
        ))
    if publishers is not None and decl.publisher_id not in publishers:
        errors.append(FieldError(
            field="publisher_id",
            message=f"unknown publisher {_echo(decl.publisher_id)}: "
            "no publisher with this id is registered with this relay",
        ))
    if developers is not None:
        errors.extend(
            FieldError(
                field=f"targets.{i}",
                message=f"unknown developer {_echo(target)}: no developer with this id is "
                'registered with this relay (use ["*"] for every registered developer)',
            )
            for i, target in enumerate(decl.targets)
            if target != "*" and target not in developers
        )
    if errors:
        raise DeclarationInvalid(_summary(errors), errors[:MAX_ERRORS])
    return decl


def _invalid(exc: pydantic.ValidationError, text: str) -> DeclarationInvalid:
    details = exc.errors(include_url=False)
    for err in details:
        if err["type"] == "json_invalid":
            return _document_error(_json_reason(str(err.get("ctx", {}).get("error", err["msg"]))))
        if not err["loc"] and err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            return _document_error(
                f"expected a JSON object at the top level, got {_kind(err['input'])}"
            )
        schema = err["input"]
        if err["loc"] == ("schema",) and err["type"] == "literal_error" and isinstance(schema, str):
            reason = (
                f"unsupported schema {_echo(schema)}; this relay accepts {DECLARATION_SCHEMA_V1}"
            )
            return DeclarationInvalid(reason, [FieldError(field="schema", message=reason)])
    # A repeated key is named even when other rules fail: the value that won may be
    # what broke them (a second "action": "withdraw" makes supersedes required). The
    # text parsed, so it nests less deeply than json.loads can follow.
    errors = _duplicate_keys(json.loads(text, object_pairs_hook=_object))
    errors.extend(validation_errors(exc))
    return DeclarationInvalid(_summary(errors), errors[:MAX_ERRORS])


def _json_reason(message: str) -> str:
    if "recursion limit" in message:
        where = message.split(" at ", 1)[1] if " at " in message else "near the start"
        return (
            f"JSON nested too deeply (the parser stops at about 200 levels, at {where}); "
            "a declaration nests at most 3 levels"
        )
    return f"not valid JSON: {message}"


def _summary(errors: Sequence[FieldError]) -> str:
    if len(errors) == 1:
        return _one_line(f"1 invalid field: {errors[0].field}: {errors[0].message}")
    fields = list(dict.fromkeys(e.field for e in errors))
    shown = ", ".join(fields[:_REASON_FIELDS])
    more = f", and {len(fields) - _REASON_FIELDS:,} more" if len(fields) > _REASON_FIELDS else ""
    return _one_line(f"{len(errors):,} invalid fields: {shown}{more}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------- duplicate keys


class _Object(dict[str, Any]):
    """A JSON object that remembers which of its keys appeared more than once."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _duplicate_keys(doc: Any) -> list[FieldError]:
    # Only called on text pydantic's parser read (it stops at about 200 levels), so
    # the recursion is bounded.
    found: list[FieldError] = []

    def walk(node: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(node, _Object):
            found.extend(
                FieldError(
                    field=_path((*path, key)),
                    message="appears more than once in the same object; parsers disagree "
                    "about which value wins, so send it once",
                )
                for key in node.duplicates
            )
            for key, value in node.items():
                walk(value, (*path, key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, (*path, i))

    walk(doc, ())
    return found


# ---------------------------------------------------------- pydantic errors


def validation_errors(exc: pydantic.ValidationError) -> list[FieldError]:
    """Translate pydantic's errors into FieldErrors: dotted field paths, messages a
    publisher can act on, errors of one field merged, model-level errors of the form
    ``"<field>: <message>"`` attributed to that field."""
    merged: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        field, message = _describe(err)
        messages = merged.setdefault(field, [])
        if message not in messages:
            messages.append(message)
    return [
        FieldError(field=field, message=_clip("; ".join(messages)))
        for field, messages in merged.items()
    ]


def _clip(message: str) -> str:
    message = _one_line(message)
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"


def _path(loc: Sequence[str | int]) -> str:
    return ".".join(str(part) for part in loc) if loc else DOCUMENT


def _clean_loc(err: ErrorDetails) -> list[str | int]:
    loc = list(err["loc"])
    unknown_key = loc.pop() if err["type"] == "extra_forbidden" and loc else None
    # pydantic adds a tag for the member of a union that failed ("constrained-str",
    # "literal['*']"): not a field. An unknown key is kept as sent, shortened, and
    # quoted unless it is a plain name (so "" or "a.b" stay recognisable).
    cleaned = [part for part in loc if isinstance(part, int) or _NAME.match(part)]
    if unknown_key is not None:
        key = str(unknown_key)
        cleaned.append(key if _NAME.match(key) and len(key) <= ECHO_LIMIT else _echo(key))
    return cleaned


def _shorten(text: str) -> str:
    return text if len(text) <= ECHO_LIMIT else text[: ECHO_LIMIT - 1] + "…"


def _echo(value: object) -> str:
    """Quote an offending input for a message: strings shortened, other values named
    by their JSON kind only (they may be large)."""
    if isinstance(value, str):
        return json.dumps(_shorten(value), ensure_ascii=False)
    return _kind(value)


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return "an object"


def _describe(err: ErrorDetails) -> tuple[str, str]:
    loc = _clean_loc(err)
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    private = any(part in _PII_FIELDS for part in loc)
    got = "" if private else f", got {_echo(value)}"
    field = _path(loc)
    name = str(loc[-1]) if loc else ""

    if loc[:1] == ["targets"] and len(loc) == 2:
        # One message for both arms of the union (a developer id, or "*").
        return field, f'must be "*" or a developer id ({_ID_RULE}){got}'
    if kind == "value_error":
        message = err["msg"].removeprefix("Value error, ")
        if match := _FIELD_PREFIX.match(message):
            # A model-level rule names its field: "supersedes: required when …".
            return _path([*loc, *match.group(1).split(".")]), match.group(2)
        return field, message
    if kind == "missing":
        return field, "required field is missing"
    if kind == "extra_forbidden":
        return field, "unknown field" + _suggestion(loc)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return field, f"must be a JSON object{got}"
    if kind == "list_type":
        hint = ' (use ["*"] for every developer)' if name == "targets" else ""
        return field, f"must be a JSON array{got}{hint}"
    if kind == "string_type":
        return field, f"must be a string{got}"
    if kind == "bool_type":
        return field, f"must be true or false{got}"
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == _IDENTIFIER_PATTERN:
            return field, f"must be {_ID_RULE}{got}"
        if ctx.get("pattern") == _SHA256_PATTERN:
            return field, f"must be a SHA-256 digest: 64 hexadecimal characters{got}"
        return field, f"{err['msg']}{got}"
    if kind == "string_too_short":
        return field, "must not be empty"
    if kind == "string_too_long":
        length = f" (got {len(value):,})" if isinstance(value, str) else ""
        return field, f"must be at most {ctx.get('max_length', 0):,} characters{length}"
    if kind == "too_short":
        if name == "uses":
            return field, "must list at least one use: " + ", ".join(u.value for u in Use)
        if name == "targets":
            return field, 'must list at least one developer id, or ["*"] for every developer'
        return field, f"must have at least {ctx.get('min_length', 1)} item(s)"
    if kind == "too_long":
        return field, (
            f"must have at most {ctx.get('max_length', 0):,} items "
            f"(got {ctx.get('actual_length', 0):,})"
        )
    if kind == "enum":
        if loc[:1] == ["uses"]:
            return field, (
                f"unknown use {_echo(value)}; expected one of: " + ", ".join(u.value for u in Use)
            )
        return field, f"{err['msg']}{got}"
    if kind == "literal_error":
        return field, f"{err['msg']}{got}"
    if kind == "timezone_aware":
        return field, (
            f"must include a UTC offset, e.g. {_TIMESTAMP_EXAMPLE} or 2026-03-01T03:00:00Z{got}"
        )
    if kind.startswith(("datetime_", "date_")):
        detail = f" ({ctx['error']})" if "error" in ctx else ""
        return field, (
            f"must be an RFC 3339 timestamp with offset, e.g. {_TIMESTAMP_EXAMPLE}{detail}{got}"
        )
    return field, err["msg"] if private else f"{err['msg']}{got}"


# Where each model sits in a declaration, to suggest a field for a misspelt one.
_MODELS: tuple[tuple[str, type[pydantic.BaseModel]], ...] = (
    ("a top-level field", Declaration),
    ("a field of artist", Artist),
    ("a field of each work", Work),
)


def _fields(model: type[pydantic.BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_at(loc: Sequence[str | int]) -> type[pydantic.BaseModel] | None:
    model: type[pydantic.BaseModel] = Declaration
    for part in loc:
        if isinstance(part, int):
            continue
        info = next(
            (i for n, i in model.model_fields.items() if (i.alias or n) == part), None
        )
        if info is None:
            return None
        inner = _model_in(info.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _model_in(arg)) is not None:
                return found
    return None


def _suggestion(loc: Sequence[str | int]) -> str:
    if not loc or not isinstance(loc[-1], str):
        return ""
    unknown = loc[-1]
    here = _model_at(loc[:-1])
    if here is not None:
        close = difflib.get_close_matches(unknown, _fields(here), n=1, cutoff=0.75)
        if close:
            return f" (did you mean {close[0]!r}?)"
    for where, model in _MODELS:
        if model is here:
            continue
        close = difflib.get_close_matches(unknown, _fields(model), n=1, cutoff=0.8)
        if close:
            return f" (did you mean {close[0]!r}, {where}?)"
    return ""
