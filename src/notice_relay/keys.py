"""API keys: who may call the HTTP API, in which role, on whose behalf.

A key is ``nr_<key_id>_<secret>``: ``key_id`` is 12 hex digits that name the key (it
is shown by ``notice-relay keys list`` and is safe to log), ``secret`` 64 hex digits
(256 random bits). The key is printed once, when it is created; the store keeps only
the SHA-256 of the secret.

Why SHA-256 and not a slow password hash (scrypt, argon2): a slow hash protects
*low-entropy* secrets that people choose, by making each guess expensive. These
secrets are 256 random bits chosen by the relay; nobody can enumerate them, fast
hash or not, so a slow hash would only add tens of milliseconds of CPU to every
request. Whoever reads the table learns nothing they can log in with.

A key is looked up by its ``key_id`` and its secret compared with
:func:`hmac.compare_digest`; an unknown ``key_id`` is compared against a dummy digest,
so an answer takes as long whether the key exists or not.

Roles and subjects:

==========  ===========================================================
role        subject
==========  ===========================================================
publisher   the publisher id (``publishers.toml``) it publishes as
developer   the developer id (a connector file) whose deliveries it sees
operator    the operator's name (recorded as the actor of replays)
auditor     the auditor's name
==========  ===========================================================
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import sqlalchemy as sa

from notice_relay.audit.store import AuditStore, metadata
from notice_relay.errors import NoticeRelayError, StoreError

__all__ = [
    "ApiKey",
    "KeyNotFound",
    "Role",
    "api_keys",
    "authenticate",
    "create_key",
    "format_key",
    "list_keys",
    "parse_key",
    "revoke_key",
]


class Role(StrEnum):
    """What a key may do; see docs in README.md ("HTTP API")."""

    PUBLISHER = "publisher"
    DEVELOPER = "developer"
    OPERATOR = "operator"
    AUDITOR = "auditor"


class KeyNotFound(NoticeRelayError):
    """No API key with this key id."""


api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("note", sa.String(500)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

_KEY = re.compile(r"^nr_([0-9a-f]{12})_([0-9a-f]{64})$")
_SUBJECT = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Compared against when the key id is unknown, so that both paths cost the same.
_DUMMY_DIGEST = hashlib.sha256(b"notice-relay/no-such-key").hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A stored key (never its secret)."""

    key_id: str
    role: Role
    subject: str
    note: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        """Not revoked."""
        return self.revoked_at is None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # SQLite hands back naive UTC
    return value


def format_key(key_id: str, secret: str) -> str:
    """The key as its holder uses it: ``nr_<key_id>_<secret>``."""
    return f"nr_{key_id}_{secret}"


def parse_key(presented: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, None for anything else."""
    m = _KEY.match(presented.strip())
    return (m.group(1), m.group(2)) if m else None


def _row(r: sa.Row[tuple[object, ...]]) -> ApiKey:
    m = r._mapping
    return ApiKey(key_id=m["key_id"], role=Role(m["role"]), subject=m["subject"], note=m["note"],
                  created_at=_aware(m["created_at"]) or datetime.now(UTC),
                  revoked_at=_aware(m["revoked_at"]))


async def create_key(store: AuditStore, role: Role | str, subject: str, *,
                     note: str | None = None) -> tuple[ApiKey, str]:
    """Create a key for ``subject`` in ``role``; return it and its plain text (shown once)."""
    role = Role(role)
    if not _SUBJECT.match(subject):
        raise ValueError(f"subject {subject!r}: must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    secret = secrets.token_hex(32)
    now = datetime.now(UTC)
    try:
        async with store.engine.begin() as conn:
            while True:
                key_id = secrets.token_hex(6)
                taken = (await conn.execute(
                    sa.select(api_keys.c.key_id).where(api_keys.c.key_id == key_id))).first()
                if taken is None:
                    break
            await conn.execute(api_keys.insert().values(
                key_id=key_id, role=role.value, subject=subject, secret_sha256=_digest(secret),
                note=note, created_at=now))
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot store the API key: {exc}") from exc
    key = ApiKey(key_id=key_id, role=role, subject=subject, note=note, created_at=now,
                 revoked_at=None)
    return key, format_key(key_id, secret)


async def list_keys(store: AuditStore, *, include_revoked: bool = False) -> list[ApiKey]:
    """Every key (without secrets), oldest first."""
    q = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
    if not include_revoked:
        q = q.where(api_keys.c.revoked_at.is_(None))
    async with store.engine.connect() as conn:
        return [_row(r) for r in (await conn.execute(q)).all()]


async def revoke_key(store: AuditStore, key_id: str) -> ApiKey:
    """Revoke a key; it is refused from the next request on. Revoking twice is harmless."""
    async with store.engine.begin() as conn:
        row = (await conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id))).first()
        if row is None:
            raise KeyNotFound(f"no API key {key_id!r}")
        if row._mapping["revoked_at"] is None:
            await conn.execute(api_keys.update().where(api_keys.c.key_id == key_id)
                               .values(revoked_at=datetime.now(UTC)))
            row = (await conn.execute(
                sa.select(api_keys).where(api_keys.c.key_id == key_id))).first()
    assert row is not None
    return _row(row)


async def authenticate(store: AuditStore, presented: str) -> ApiKey | None:
    """The active key ``presented`` is, or None (malformed, unknown, wrong secret, revoked)."""
    parsed = parse_key(presented)
    if parsed is None:
        return None
    key_id, secret = parsed
    async with store.engine.connect() as conn:
        row = (await conn.execute(sa.select(api_keys).where(api_keys.c.key_id == key_id))).first()
    stored = row._mapping["secret_sha256"] if row is not None else _DUMMY_DIGEST
    ok = hmac.compare_digest(stored.encode("ascii"), _digest(secret).encode("ascii"))
    if row is None or not ok:
        return None
    key = _row(row)
    return key if key.active else None
