"""Who is calling: API keys in ``Authorization: Bearer nr_<key_id>_<secret>``, and
the roles each endpoint admits.

No key, or a key that does not verify (malformed, unknown, wrong secret, revoked),
is 401 with one and the same answer, so a caller cannot tell which. A valid key
whose role may not use an endpoint is 403. What belongs to someone else is 404,
exactly like what does not exist (the handlers see to that).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from notice_relay.api.errors import forbidden, unauthorized
from notice_relay.api.state import get_state
from notice_relay.keys import Role, authenticate

#: Documents the scheme in OpenAPI (the "Authorize" button of /docs); the header
#: itself is read by :func:`principal_of`, which decides every answer.
bearer = HTTPBearer(
    auto_error=False, scheme_name="ApiKey",
    description="An API key from `notice-relay keys create`: `Bearer nr_<key_id>_<secret>`.",
)

Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]

_BAD_KEY = "the API key is not valid"


@dataclass(frozen=True)
class Principal:
    """The caller: a key's role and subject (publisher id, developer id, person)."""

    role: Role
    subject: str
    key_id: str


async def principal_of(request: Request) -> Principal | None:
    """The caller of ``request``; None without an Authorization header; 401 when the
    header is there but does not hold a valid key."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("expected Authorization: Bearer nr_<key_id>_<secret>")
    key = await authenticate(get_state(request).store, value.strip())
    if key is None:
        raise unauthorized(_BAD_KEY)
    request.state.key_id = key.key_id
    return Principal(role=key.role, subject=key.subject, key_id=key.key_id)


def require(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting keys of ``roles`` only."""
    allowed = ", ".join(r.value for r in roles)

    async def dependency(request: Request, _credentials: Credentials) -> Principal:
        principal = await principal_of(request)
        if principal is None:
            raise unauthorized()
        if principal.role not in roles:
            raise forbidden(f"a {principal.role.value} key cannot do this; it needs the role: "
                            f"{allowed}")
        return principal

    return dependency


async def optional_principal(request: Request, _credentials: Credentials) -> Principal | None:
    """The caller when a key is given (it must be valid), None otherwise."""
    return await principal_of(request)
