"""Developers and publishers as the operator configures them: one TOML file per AI
developer in ``connectors/``, and one ``publishers.toml`` registry.

A developer file::

    id = "acme-ai"                      # must equal the file name: connectors/acme-ai.toml
    name = "Acme AI"
    accepts = ["train-ai", "train-genai", "prompt-name"]
    ack_sla = "30d"

    [[channel]]
    type = "webhook"
    url = "https://optout.acme-ai.example.invalid/notices"
    secret_env = "ACME_AI_WEBHOOK_SECRET"   # whsec_…; never the secret itself

Everything is validated when the files are read: a broken file is a
:class:`~notice_relay.errors.ConnectorConfigError` naming the file and the dotted field
(``channel.0.url``). :func:`load_developers` raises the first error;
:func:`check_connectors` returns all of them, for ``notice-relay connectors check``.

Secrets (webhook signing keys, registry tokens) never live in these files: a channel
names an environment variable or a file, and :func:`resolve_secret` /
:func:`resolve_token` read it when the channel is opened.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from notice_relay.durations import parse_duration
from notice_relay.errors import ConfigError, ConnectorConfigError
from notice_relay.models import ChannelType, Identifier, Use
from notice_relay.signing import SECRET_PREFIX, decode_secret
from notice_relay.urls import check_http_url

__all__ = [
    "ChannelConfig",
    "Developer",
    "EmailChannelConfig",
    "Publisher",
    "RegistryChannelConfig",
    "WebhookChannelConfig",
    "check_connectors",
    "check_publishers",
    "load_developers",
    "load_publishers",
    "resolve_secret",
    "resolve_token",
]

#: Standard Webhooks secrets are 24 to 64 bytes of key material.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64

# --------------------------------------------------------------------------- field types


def _toml_type(value: object) -> str:
    """How a TOML author would name the type of ``value``."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


def _to_duration(value: object) -> object:
    # Python callers may pass a timedelta; TOML authors write strings. A bare number is
    # refused because "10" does not say whether it means seconds or milliseconds.
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        # pydantic reports ValueError (not TypeError) as a validation error of the field.
        raise ValueError(  # noqa: TRY004
            f'must be a duration string such as "30s", not {_toml_type(value)}'
        )
    return parse_duration(value)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than 0")
    return value


def _no_credentials_in_url(value: str) -> str:
    value = check_http_url(value)
    authority = value.split("://", 1)[1].split("/", 1)[0]
    if "@" in authority:
        # user:password@host would put a secret into a file that is committed to git.
        raise ValueError("must not contain credentials (user:password@); secrets never live here")
    return value


def _email_address(value: str) -> str:
    # Deliberately a plain ASCII addr-spec check rather than email-validator: that
    # library refuses the reserved ".invalid" domain the example files must use, and an
    # operator-written address needs only to be unambiguous and safe to put in a header
    # (no whitespace or CR/LF, exactly one "@", a dotted domain).
    if not _EMAIL.fullmatch(value):
        raise ValueError(f"{value!r} is not an email address (local@domain.tld)")
    return value


_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)


def _single_line(value: str) -> str:
    if any(ch < " " or ch == "\x7f" for ch in value):
        raise ValueError("must be one line without control characters")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Duration = Annotated[timedelta, BeforeValidator(_to_duration)]
PositiveDuration = Annotated[timedelta, BeforeValidator(_to_duration), AfterValidator(_positive)]
Url = Annotated[
    str, StringConstraints(min_length=1, max_length=2048), AfterValidator(_no_credentials_in_url)
]
EmailAddress = Annotated[str, StringConstraints(max_length=254), AfterValidator(_email_address)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_single_line)]
ChannelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
# TOML has no path type; a string is accepted (lax) and made a Path.
FilePath = Annotated[Path, Field(strict=False)]
RetrySchedule = Annotated[list[Duration], Field(min_length=1, max_length=50)]


class _Config(BaseModel):
    """Configuration: unknown keys are errors, and TOML types are taken as written
    (``enabled = "yes"`` is an error, not ``True``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _relative_to_file(value: Path | None, info: ValidationInfo) -> Path | None:
    # A relative secret path means "next to the connector file", so that the worker's
    # current directory never changes which file is read.
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if value is None or value.is_absolute() or base is None:
        return value
    return Path(base) / value


def _exactly_one(owner: _Config, env_key: str, file_key: str) -> None:
    given = [key for key in (env_key, file_key) if getattr(owner, key) is not None]
    if not given:
        raise ValueError(
            f"{env_key}: required: name the environment variable ({env_key}) or the file "
            f"({file_key}) that holds the secret"
        )
    if len(given) > 1:
        raise ValueError(f"{file_key}: give {env_key} or {file_key}, not both")


# ------------------------------------------------------------------------------ channels


class WebhookChannelConfig(_Config):
    """A signed webhook (Standard Webhooks) that receives Notice v1 JSON."""

    type: Literal["webhook"]
    name: ChannelName = "webhook"
    url: Url
    secret_env: EnvName | None = None
    secret_file: FilePath | None = None
    timeout: PositiveDuration = timedelta(seconds=10)
    allow_http: bool = False
    allow_private: bool = Field(
        default=False,
        description="Allow private, loopback and link-local addresses (dev/test only). "
        "Checked at connect time on the address connected to (notice_relay.netguard).",
    )
    rate_limit: float | None = Field(default=None, gt=0, description="Requests per second.")
    retry_schedule: RetrySchedule | None = None
    enabled: bool = True
    max_in_flight: int = Field(default=8, ge=1, le=256)

    _secret_file_base = field_validator("secret_file")(_relative_to_file)

    @field_validator("timeout")
    @classmethod
    def _bounded_timeout(cls, value: timedelta) -> timedelta:
        # One attempt must not hold a delivery batch for long; slow receivers are retried.
        if value > timedelta(minutes=5):
            raise ValueError("must be at most 5m")
        return value

    @model_validator(mode="after")
    def _rules(self) -> WebhookChannelConfig:
        _exactly_one(self, "secret_env", "secret_file")
        if not self.allow_http and not self.url.lower().startswith("https://"):
            raise ValueError("url: must be https:// (set allow_http = true for local testing)")
        return self

    @property
    def channel_type(self) -> ChannelType:
        """The channel's kind."""
        return ChannelType.WEBHOOK


class EmailChannelConfig(_Config):
    """An opt-out mailbox; notices are sent one by one or as a digest
    (:mod:`notice_relay.channels.email`).

    Only the recipients and the digest are the developer's: the SMTP server, sender
    address and credentials are the operator's (``NOTICE_RELAY_SMTP_*``, see
    :class:`notice_relay.channels.email.SmtpSettings`), never in this file.
    """

    type: Literal["email"]
    name: ChannelName = "email"
    to: list[EmailAddress] = Field(min_length=1, max_length=50)
    digest: Duration = Field(default=timedelta(0), description='"0" sends each notice at once.')
    max_per_digest: int = Field(default=100, ge=1, le=10_000)
    retry_schedule: RetrySchedule | None = None
    enabled: bool = True

    @property
    def channel_type(self) -> ChannelType:
        """The channel's kind."""
        return ChannelType.EMAIL


class RegistryChannelConfig(_Config):
    """A do-not-train registry reached through an adapter
    (:mod:`notice_relay.channels.registry`)."""

    type: Literal["registry"]
    name: ChannelName = "registry"
    # A closed list, so that a typo fails at start-up; each new adapter extends it.
    adapter: Literal["generic-rest"] = "generic-rest"
    base_url: Url
    token_env: EnvName | None = None
    token_file: FilePath | None = None
    batch_size: int = Field(default=100, ge=1, le=10_000)
    # Same meaning as on webhooks; the registry sender's tests need local HTTP servers.
    allow_http: bool = False
    allow_private: bool = False
    retry_schedule: RetrySchedule | None = None
    enabled: bool = True

    _token_file_base = field_validator("token_file")(_relative_to_file)

    @model_validator(mode="after")
    def _rules(self) -> RegistryChannelConfig:
        _exactly_one(self, "token_env", "token_file")
        if not self.allow_http and not self.base_url.lower().startswith("https://"):
            raise ValueError("base_url: must be https:// (set allow_http = true for local testing)")
        return self

    @property
    def channel_type(self) -> ChannelType:
        """The channel's kind."""
        return ChannelType.REGISTRY


ChannelConfig = Annotated[
    WebhookChannelConfig | EmailChannelConfig | RegistryChannelConfig,
    Field(discriminator="type"),
]
"""One ``[[channel]]`` table; ``type`` selects which."""


# ---------------------------------------------------------------------------- developers


class Developer(_Config):
    """An AI developer: which uses it takes notices for, and how it is reached."""

    id: Identifier
    name: Name
    accepts: list[Annotated[Use, Field(strict=False)]] = Field(min_length=1)
    ack_sla: PositiveDuration = timedelta(days=30)
    channels: list[ChannelConfig] = Field(alias="channel", min_length=1)
    enabled: bool = True

    @field_validator("accepts")
    @classmethod
    def _unique_uses(cls, value: list[Use]) -> list[Use]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _unique_channel_names(self) -> Developer:
        seen: dict[str, int] = {}
        for index, channel in enumerate(self.channels):
            if channel.name in seen:
                raise ValueError(
                    f"channel.{index}.name: duplicate channel name {channel.name!r} (also "
                    f"channel {seen[channel.name]}); give each channel a distinct name"
                )
            seen[channel.name] = index
        return self

    def get_channel(
        self, name: str
    ) -> WebhookChannelConfig | EmailChannelConfig | RegistryChannelConfig:
        """The channel called ``name``; :class:`KeyError` if there is none."""
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(f"developer {self.id!r} has no channel {name!r}")


class Publisher(_Config):
    """A registered publisher: an artist-facing app allowed to publish declarations."""

    id: Identifier
    name: Name
    enabled: bool = True


class _PublishersFile(_Config):
    publishers: list[Publisher] = Field(default_factory=list, alias="publisher")

    @model_validator(mode="after")
    def _unique_ids(self) -> _PublishersFile:
        seen: dict[str, int] = {}
        for index, publisher in enumerate(self.publishers):
            key = publisher.id.casefold()
            if key in seen:
                raise ValueError(
                    f"publisher.{index}.id: duplicate publisher id {publisher.id!r} (also "
                    f"publisher {seen[key]})"
                )
            seen[key] = index
        return self


# ------------------------------------------------------------------------ error reporting

# Keys that look like someone pasted a secret into the file.
_SECRET_KEYS = frozenset(
    {"secret", "secrets", "token", "password", "api_key", "apikey", "key", "bearer",
     "authorization", "webhook_secret", "signing_secret"}
)
_NOT_IN_FILES = (
    "secrets never live in connector files: name an environment variable "
    "(secret_env / token_env) or a file (secret_file / token_file) that holds it"
)
_CHANNEL_TAGS = frozenset(tag.value for tag in ChannelType)
_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (true or false)",
    "list_type": "an array",
    "model_type": "a table",
    "dict_type": "a table",
    "model_attributes_type": "a table",
}


def _known_fields() -> frozenset[str]:
    models: list[type[BaseModel]] = [
        Developer, WebhookChannelConfig, EmailChannelConfig, RegistryChannelConfig,
        Publisher, _PublishersFile,
    ]
    names: set[str] = set()
    for model in models:
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
    return frozenset(names)


_FIELDS = _known_fields()
# A validator that checks several fields names the one at fault as "field: message".
_NAMED_FIELD = re.compile(r"^([A-Za-z_]+(?:\.[A-Za-z0-9_]+)*): (.+)$", re.DOTALL)


def _clean_loc(loc: tuple[int | str, ...]) -> list[str]:
    parts: list[str] = []
    for index, part in enumerate(loc):
        # The discriminated union adds the tag ("webhook") after "channel.N": the author
        # wrote no such key, so it is dropped from the dotted name.
        if index >= 2 and loc[index - 2] == "channel" and isinstance(loc[index - 1], int) \
                and part in _CHANNEL_TAGS:
            continue
        parts.append(str(part))
    return parts


def _describe(error: ErrorDetails) -> tuple[list[str], str]:
    """The dotted field and a message for one pydantic error. The input value is only
    quoted where it cannot be a secret (enum tokens, channel types)."""
    loc = _clean_loc(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return loc, "required key is missing"
    if kind == "extra_forbidden":
        if loc and loc[-1].lower() in _SECRET_KEYS:
            return loc, _NOT_IN_FILES
        return loc, "unknown key"
    if kind == "union_tag_not_found":
        return [*loc, "type"], "required key is missing (webhook, email or registry)"
    if kind == "union_tag_invalid":
        return [*loc, "type"], (
            f"unknown channel type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
        )
    if kind == "enum":
        return loc, f"unknown token {error['input']!r}; expected one of {ctx.get('expected')}"
    if kind == "list_type" and loc and loc[-1] in ("channel", "publisher"):
        # The common slip: [channel] (one table) instead of [[channel]] (an array of them).
        return loc, f"must be an array of tables ([[{loc[-1]}]]), not {_toml_type(error['input'])}"
    if kind in _TYPE_NAMES:
        return loc, f"must be {_TYPE_NAMES[kind]}, not {_toml_type(error['input'])}"
    if kind == "value_error" and "error" in ctx:
        message = str(ctx["error"])
        named = _NAMED_FIELD.match(message)
        if named and named.group(1).split(".")[0] in _FIELDS:
            return [*loc, *named.group(1).split(".")], named.group(2)
        return loc, message
    return loc, error["msg"]


def _validation_errors(path: Path, exc: ValidationError) -> list[ConnectorConfigError]:
    errors = []
    for error in exc.errors(include_url=False):
        loc, message = _describe(error)
        errors.append(ConnectorConfigError(str(path), ".".join(loc), message))
    return errors


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConnectorConfigError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConnectorConfigError(str(path), "", f"not UTF-8 text (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries "(at line L, column C)".
        raise ConnectorConfigError(str(path), "", f"TOML syntax error: {exc}") from None


# ------------------------------------------------------------------------------- loading


def _connector_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ConnectorConfigError(str(directory), "", "is not a directory")
    # Hidden files are editor backups and lock files, never connectors.
    return sorted(p for p in directory.glob("*.toml") if not p.name.startswith("."))


def _parse_developer(path: Path) -> tuple[Developer | None, list[ConnectorConfigError]]:
    try:
        data = _read_toml(path)
    except ConnectorConfigError as exc:
        return None, [exc]
    try:
        developer = Developer.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as exc:
        return None, _validation_errors(path, exc)
    if developer.id != path.stem:
        return None, [ConnectorConfigError(
            str(path), "id", f"is {developer.id!r} but must equal the file name {path.stem!r}"
        )]
    return developer, []


def _load_all(directory: Path) -> tuple[dict[str, Developer], list[ConnectorConfigError]]:
    developers: dict[str, Developer] = {}
    files: dict[str, Path] = {}
    errors: list[ConnectorConfigError] = []
    for path in _connector_files(directory):
        developer, found = _parse_developer(path)
        errors.extend(found)
        if developer is None:
            continue
        # Ids are compared case-insensitively: "Acme-AI" and "acme-ai" as two
        # developers would make every declaration's targets ambiguous.
        key = developer.id.casefold()
        if key in files:
            errors.append(ConnectorConfigError(
                str(path), "id", f"duplicate developer id {developer.id!r}: also in {files[key]}"
            ))
            continue
        files[key] = path
        developers[developer.id] = developer
    return developers, errors


def load_developers(directory: Path) -> dict[str, Developer]:
    """Read every ``*.toml`` in ``directory`` (sorted by name) into developers by id.

    Raises the first :class:`~notice_relay.errors.ConnectorConfigError` found; use
    :func:`check_connectors` to see them all. An empty directory gives ``{}``.
    """
    developers, errors = _load_all(directory)
    if errors:
        raise errors[0]
    return developers


def check_connectors(
    directory: Path,
    *,
    check_secrets: bool = False,
    environ: Mapping[str, str] | None = None,
) -> list[ConnectorConfigError]:
    """Every error in the connector files of ``directory`` (empty when all are valid).

    With ``check_secrets``, also read each enabled channel's secret or token and report
    the ones that are missing or malformed (never their values).
    """
    try:
        developers, errors = _load_all(directory)
    except ConnectorConfigError as exc:
        return [exc]
    if check_secrets:
        for developer in developers.values():
            errors.extend(_secret_errors(directory / f"{developer.id}.toml", developer, environ))
    return errors


def _secret_errors(
    path: Path, developer: Developer, environ: Mapping[str, str] | None
) -> Iterable[ConnectorConfigError]:
    for index, channel in enumerate(developer.channels):
        if not channel.enabled:
            continue
        try:
            if isinstance(channel, WebhookChannelConfig):
                field = "secret_env" if channel.secret_env else "secret_file"
                resolve_secret(channel, developer.id, environ=environ)
            elif isinstance(channel, RegistryChannelConfig):
                field = "token_env" if channel.token_env else "token_file"
                resolve_token(channel, developer.id, environ=environ)
        except ConfigError as exc:
            yield ConnectorConfigError(str(path), f"channel.{index}.{field}", str(exc))


def _parse_publishers(path: Path) -> tuple[dict[str, Publisher], list[ConnectorConfigError]]:
    try:
        data = _read_toml(path)
    except ConnectorConfigError as exc:
        return {}, [exc]
    try:
        registry = _PublishersFile.model_validate(data)
    except ValidationError as exc:
        return {}, _validation_errors(path, exc)
    return {publisher.id: publisher for publisher in registry.publishers}, []


def load_publishers(path: Path) -> dict[str, Publisher]:
    """Read the publisher registry (``[[publisher]]`` tables) into publishers by id.

    Raises the first :class:`~notice_relay.errors.ConnectorConfigError`.
    """
    publishers, errors = _parse_publishers(path)
    if errors:
        raise errors[0]
    return publishers


def check_publishers(path: Path) -> list[ConnectorConfigError]:
    """Every error in the publisher registry at ``path`` (empty when it is valid)."""
    return _parse_publishers(path)[1]


# ------------------------------------------------------------------------------- secrets


def _read_source(
    env_key: str | None,
    file_path: Path | None,
    what: str,
    owner: str,
    environ: Mapping[str, str] | None,
) -> tuple[str, str]:
    """The raw value and a description of where it came from (never the value)."""
    if env_key is not None:
        env = os.environ if environ is None else environ
        if env_key not in env:
            raise ConfigError(
                f"{owner}: the environment variable {env_key} (the {what}) is not set"
            )
        return env[env_key], f"the environment variable {env_key}"
    if file_path is None:  # the models make this impossible; kept for the type checker
        raise ConfigError(f"{owner}: no source for the {what}")
    try:
        return file_path.read_text(encoding="utf-8"), f"the file {file_path}"
    except FileNotFoundError:
        raise ConfigError(f"{owner}: the {what} file {file_path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{owner}: cannot read the {what} file {file_path}: {reason}") from None


def _owner(developer_id: str | None, channel: str) -> str:
    if developer_id:
        return f"developer {developer_id!r}, channel {channel!r}"
    return f"channel {channel!r}"


def resolve_secret(
    cfg: WebhookChannelConfig,
    developer_id: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The webhook signing secrets of ``cfg``, read from its variable or file.

    The value holds one or more ``whsec_<base64>`` secrets separated by whitespace or
    commas; several are active during a key rotation, and each gets a signature. Raw
    base64 without the prefix is refused, in files too: one format for every source,
    and it is the form Standard Webhooks tools print, so a secret copied from a
    developer's dashboard works as is. Keys must be 24-64 bytes (the spec's range).

    Raises :class:`~notice_relay.errors.ConfigError` naming the developer, channel and
    variable or file; the message never contains a secret.
    """
    owner = _owner(developer_id, cfg.name)
    raw, source = _read_source(cfg.secret_env, cfg.secret_file, "webhook secret", owner, environ)
    values = list(dict.fromkeys(part for part in re.split(r"[\s,]+", raw) if part))
    if not values:
        raise ConfigError(f"{owner}: {source} is empty (expected whsec_… secrets)")
    for number, value in enumerate(values, start=1):
        label = f"secret {number} of {len(values)} in {source}"
        if not value.startswith(SECRET_PREFIX):
            raise ConfigError(f"{owner}: {label} does not start with {SECRET_PREFIX}")
        try:
            key = decode_secret(value)
        except ValueError:
            raise ConfigError(f"{owner}: {label} is not base64 after {SECRET_PREFIX}") from None
        if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
            raise ConfigError(
                f"{owner}: {label} is {len(key)} bytes; Standard Webhooks secrets are "
                f"{MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes"
            )
    return values


def resolve_token(
    cfg: RegistryChannelConfig,
    developer_id: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The registry bearer token of ``cfg``, read from its variable or file and stripped.

    Raises :class:`~notice_relay.errors.ConfigError` naming the developer, channel and
    variable or file when it is missing, empty or not a single printable word (a token
    with a newline inside would let it forge HTTP headers).
    """
    owner = _owner(developer_id, cfg.name)
    raw, source = _read_source(cfg.token_env, cfg.token_file, "registry token", owner, environ)
    token = raw.strip()
    if not token:
        raise ConfigError(f"{owner}: {source} is empty")
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ConfigError(
            f"{owner}: the token in {source} contains whitespace or control characters"
        )
    return token
