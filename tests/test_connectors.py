"""Connector and publisher files: what loads, and how a broken file is reported."""

from __future__ import annotations

import base64
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest

from notice_relay.connectors import (
    Developer,
    EmailChannelConfig,
    RegistryChannelConfig,
    WebhookChannelConfig,
    check_connectors,
    check_publishers,
    load_developers,
    load_publishers,
    resolve_secret,
    resolve_token,
)
from notice_relay.errors import ConfigError, ConnectorConfigError
from notice_relay.models import Use

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
id = "acme-ai"
name = "Acme AI"
accepts = ["train-ai", "prompt-name"]
{top}
[[channel]]
type = "webhook"
url = "https://hooks.acme-ai.example.invalid/notices"
secret_env = "ACME_SECRET"
{channel}
"""


def _write(directory: Path, stem: str, text: str) -> Path:
    path = directory / f"{stem}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _good(top: str = "", channel: str = "") -> str:
    return GOOD.format(top=top, channel=channel)


def _whsec(size: int = 32) -> str:
    return "whsec_" + base64.b64encode(os.urandom(size)).decode()


# ------------------------------------------------------------------------------ loading


def test_example_connectors_load_cleanly() -> None:
    """The example connectors/ shipped in the repository are valid, one of each type."""
    developers = load_developers(REPO / "connectors")
    assert sorted(developers) == ["acme-ai", "brushstroke-labs", "canvas-research", "dataloom"]
    assert check_connectors(REPO / "connectors") == []
    types = {type(c) for d in developers.values() for c in d.channels}
    assert types == {WebhookChannelConfig, EmailChannelConfig, RegistryChannelConfig}
    for developer in developers.values():
        for channel in developer.channels:
            address = getattr(channel, "url", None) or getattr(channel, "base_url", None)
            addresses = [address] if address else list(getattr(channel, "to", []))
            assert all(".example.invalid" in a for a in addresses), addresses


def test_example_publishers_load_cleanly() -> None:
    """The example publishers.toml registers artfolio and pixelboard, both enabled."""
    publishers = load_publishers(REPO / "publishers.toml")
    assert sorted(publishers) == ["artfolio", "pixelboard"]
    assert all(p.enabled for p in publishers.values())
    assert check_publishers(REPO / "publishers.toml") == []


def test_defaults_and_parsed_values(tmp_path: Path) -> None:
    """A minimal webhook connector gets the documented defaults; durations are parsed."""
    _write(tmp_path, "acme-ai", _good(channel='retry_schedule = ["5s", "5m"]'))
    developer = load_developers(tmp_path)["acme-ai"]
    assert developer.accepts == [Use.TRAIN_AI, Use.PROMPT_NAME]
    assert developer.ack_sla == timedelta(days=30)
    assert developer.enabled
    channel = developer.get_channel("webhook")
    assert isinstance(channel, WebhookChannelConfig)
    assert channel.timeout == timedelta(seconds=10)
    assert channel.max_in_flight == 8
    assert (channel.allow_http, channel.allow_private, channel.enabled) == (False, False, True)
    assert channel.rate_limit is None
    assert channel.retry_schedule == [timedelta(seconds=5), timedelta(minutes=5)]
    with pytest.raises(KeyError):
        developer.get_channel("email")


def test_files_are_read_in_name_order_and_hidden_files_skipped(tmp_path: Path) -> None:
    """Developers come back sorted by file name; dotfiles (editor leftovers) are ignored."""
    for stem in ("zeta", "alpha", "mid"):
        _write(tmp_path, stem, _good().replace('"acme-ai"', f'"{stem}"'))
    (tmp_path / ".alpha.toml").write_text("not toml at all [", encoding="utf-8")
    (tmp_path / "README.md").write_text("# not a connector", encoding="utf-8")
    assert list(load_developers(tmp_path)) == ["alpha", "mid", "zeta"]


def test_relative_secret_file_is_next_to_the_connector(tmp_path: Path) -> None:
    """secret_file = "secrets/x" means next to the TOML file, whatever the cwd."""
    text = _good().replace('secret_env = "ACME_SECRET"', 'secret_file = "secrets/acme"')
    _write(tmp_path, "acme-ai", text)
    channel = load_developers(tmp_path)["acme-ai"].channels[0]
    assert isinstance(channel, WebhookChannelConfig)
    assert channel.secret_file == tmp_path / "secrets" / "acme"


# ---------------------------------------------------------------------- broken files

BROKEN = [
    pytest.param(_good(top="accepts_all = true"), "accepts_all", "unknown key", id="unknown-key"),
    pytest.param(_good(channel="retries = 3"), "channel.0.retries", "unknown key",
                 id="unknown-channel-key"),
    pytest.param(_good().replace('name = "Acme AI"\n', ""), "name", "required key is missing",
                 id="missing-key"),
    pytest.param(_good().replace('url = "https://hooks.acme-ai.example.invalid/notices"\n', ""),
                 "channel.0.url", "required key is missing", id="missing-channel-key"),
    pytest.param(_good().split("[[channel]]")[0], "channel", "required key is missing",
                 id="no-channel"),
    pytest.param(_good(top='enabled = "yes"'), "enabled", "must be a boolean (true or false), "
                 "not a string", id="wrong-type-bool"),
    pytest.param(_good(channel='max_in_flight = "8"'), "channel.0.max_in_flight",
                 "must be an integer, not a string", id="wrong-type-int"),
    pytest.param(_good(top='accepts = "train-ai"').replace(
                 'accepts = ["train-ai", "prompt-name"]\n', ""), "accepts",
                 "must be an array, not a string", id="wrong-type-list"),
    pytest.param(_good().replace("[[channel]]", "[channel]"), "channel",
                 "must be an array of tables ([[channel]]), not a table", id="single-bracket"),
    pytest.param(_good(channel="max_in_flight = 0"), "channel.0.max_in_flight",
                 "greater than or equal to 1", id="out-of-range"),
    pytest.param(_good(top='ack_sla = "30 days"'), "ack_sla", "invalid duration '30 days'",
                 id="bad-duration"),
    pytest.param(_good(top='ack_sla = "0"'), "ack_sla", "must be longer than 0",
                 id="zero-sla"),
    pytest.param(_good(channel="timeout = 10"), "channel.0.timeout",
                 'must be a duration string such as "30s", not an integer', id="duration-number"),
    pytest.param(_good(channel='timeout = "1h"'), "channel.0.timeout", "at most 5m",
                 id="timeout-too-long"),
    pytest.param(_good(channel='retry_schedule = ["5s", "5x"]'), "channel.0.retry_schedule.1",
                 "unknown unit 'x'", id="bad-retry-step"),
    pytest.param(_good(channel="retry_schedule = []"), "channel.0.retry_schedule",
                 "at least 1 item", id="empty-retry-schedule"),
    pytest.param(_good().replace('"train-ai", "prompt-name"', '"train-ai", "train_genai"'),
                 "accepts.1", "unknown token 'train_genai'; expected one of 'train-ai'",
                 id="bad-use-token"),
    pytest.param(_good().replace('"train-ai", "prompt-name"', ""), "accepts",
                 "at least 1 item", id="no-uses"),
    pytest.param(_good().replace('id = "acme-ai"', 'id = "acme ai"'), "id",
                 "should match pattern", id="bad-id"),
    pytest.param(_good().replace('id = "acme-ai"', 'id = "acme"'), "id",
                 "is 'acme' but must equal the file name 'acme-ai'", id="id-not-stem"),
    pytest.param(_good().replace("https://", "http://"), "channel.0.url",
                 "must be https:// (set allow_http = true", id="plain-http"),
    pytest.param(_good().replace("https://", "https://user:pw@"), "channel.0.url",
                 "must not contain credentials", id="credentials-in-url"),
    pytest.param(_good().replace("https://hooks", "ftp://hooks"), "channel.0.url",
                 "must be an http(s) URL", id="not-http-url"),
    pytest.param(_good(channel='secret_file = "/run/secrets/acme"'), "channel.0.secret_file",
                 "give secret_env or secret_file, not both", id="two-secret-sources"),
    pytest.param(_good().replace('secret_env = "ACME_SECRET"\n', ""), "channel.0.secret_env",
                 "required: name the environment variable", id="no-secret-source"),
    pytest.param(_good(channel='secret_env = "ACME_SECRET"'), "",
                 "TOML syntax error: Cannot overwrite a value (at line 9, column",
                 id="duplicate-toml-key"),
    pytest.param(_good(top="name = "), "", "TOML syntax error: Invalid value (at line 4, column",
                 id="toml-syntax"),
    pytest.param(_good().replace('type = "webhook"', 'type = "sms"'), "channel.0.type",
                 "unknown channel type 'sms'", id="unknown-channel-type"),
    pytest.param(_good().replace('type = "webhook"\n', ""), "channel.0.type",
                 "required key is missing", id="missing-channel-type"),
    pytest.param(_good() + '\n[[channel]]\ntype = "webhook"\nurl = "https://b.example.invalid/"\n'
                 'secret_env = "B"\n', "channel.1.name", "duplicate channel name 'webhook'",
                 id="duplicate-channel-name"),
    pytest.param(_good() + '\n[[channel]]\ntype = "email"\nto = ["ok@a.example.invalid", '
                 '"not an address"]\n', "channel.1.to.1", "is not an email address",
                 id="bad-email"),
    pytest.param(_good() + '\n[[channel]]\ntype = "email"\nto = ["a@b.example.invalid"]\n'
                 'digest = "1 hour"\n', "channel.1.digest", "invalid duration '1 hour'",
                 id="bad-digest"),
    pytest.param(_good() + '\n[[channel]]\ntype = "registry"\nadapter = "spawning"\n'
                 'base_url = "https://r.example.invalid/"\ntoken_env = "T"\n',
                 "channel.1.adapter", "generic-rest", id="unknown-adapter"),
    pytest.param(_good() + '\n[[channel]]\ntype = "registry"\n'
                 'base_url = "https://r.example.invalid/"\n', "channel.1.token_env",
                 "required", id="registry-without-token"),
    pytest.param(_good() + '\n[[channel]]\ntype = "registry"\n'
                 'base_url = "https://r.example.invalid/"\ntoken_env = "T"\nbatch_size = 0\n',
                 "channel.1.batch_size", "greater than or equal to 1", id="bad-batch-size"),
]


@pytest.mark.parametrize(("text", "field", "fragment"), BROKEN)
def test_broken_file_error_names_the_file_and_the_field(
    tmp_path: Path, text: str, field: str, fragment: str
) -> None:
    """Each kind of mistake is a ConnectorConfigError whose path is the file, whose
    field is the dotted key at fault, and whose message says what is wrong."""
    path = _write(tmp_path, "acme-ai", text)
    with pytest.raises(ConnectorConfigError) as caught:
        load_developers(tmp_path)
    error = caught.value
    assert error.path == str(path)
    assert error.field == field
    assert fragment in error.message
    assert str(error).startswith(f"{path}: ")


@pytest.mark.parametrize("key", ["secret", "token", "password", "webhook_secret"])
def test_a_secret_in_the_file_is_refused_without_echoing_it(tmp_path: Path, key: str) -> None:
    """A secret written into the TOML is an error that says secrets never live there,
    and the error (and its traceback chain) never contains the value."""
    secret = _whsec()
    _write(tmp_path, "acme-ai", _good(channel=f'{key} = "{secret}"'))
    with pytest.raises(ConnectorConfigError) as caught:
        load_developers(tmp_path)
    error = caught.value
    assert error.field == f"channel.0.{key}"
    assert "secrets never live in connector files" in error.message
    assert secret not in "".join(traceback.format_exception(error))


def test_not_utf8_and_missing_directory(tmp_path: Path) -> None:
    """A file that is not UTF-8 and a connectors path that is not a directory are
    reported with their path."""
    (tmp_path / "acme-ai.toml").write_bytes(b'id = "\xff"\n')
    with pytest.raises(ConnectorConfigError, match="not UTF-8"):
        load_developers(tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(ConnectorConfigError, match="is not a directory") as caught:
        load_developers(missing)
    assert caught.value.path == str(missing)
    assert check_connectors(missing)[0].path == str(missing)


def test_duplicate_ids_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    """Two files whose ids differ only in case would make targets ambiguous: the
    second one is reported, naming the first."""
    first = _write(tmp_path, "Acme-AI", _good().replace('"acme-ai"', '"Acme-AI"'))
    second = _write(tmp_path, "acme-ai", _good())
    errors = check_connectors(tmp_path)
    assert [(e.path, e.field) for e in errors] == [(str(second), "id")]
    assert str(first) in errors[0].message


def test_check_collects_every_error_across_files(tmp_path: Path) -> None:
    """check_connectors reports all errors of all files (files by name, a file's
    errors in field order), where load_developers stops at the first."""
    a = _write(tmp_path, "a-dev", _good(top='ack_sla = "soon"\nenabled = 1',
                                        channel="timeout = 5").replace('"acme-ai"', '"a-dev"'))
    b = _write(tmp_path, "b-dev", "id = 'b-dev'\n[[channel\n")
    _write(tmp_path, "c-dev", _good().replace('"acme-ai"', '"c-dev"'))
    errors = check_connectors(tmp_path)
    assert [(e.path, e.field) for e in errors] == [
        (str(a), "ack_sla"),
        (str(a), "channel.0.timeout"),
        (str(a), "enabled"),
        (str(b), ""),
    ]
    with pytest.raises(ConnectorConfigError) as caught:
        load_developers(tmp_path)
    assert (caught.value.path, caught.value.field) == (str(a), "ack_sla")


def test_developer_model_keeps_toml_types(tmp_path: Path) -> None:
    """Values are taken as TOML typed them: no "true" strings or "8" numbers sneak in,
    and Developer validates Python data the same way (alias "channel")."""
    developer = Developer.model_validate({
        "id": "x", "name": "X", "accepts": ["train-ai", "train-ai"],
        "channel": [{"type": "email", "to": ["a@b.example.invalid"]}],
    })
    assert developer.accepts == [Use.TRAIN_AI]  # duplicates dropped
    channel = developer.channels[0]
    assert isinstance(channel, EmailChannelConfig)
    assert channel.digest == timedelta(0)
    assert channel.max_per_digest == 100
    assert channel.name == "email"


# ---------------------------------------------------------------------------- publishers


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ('[[publisher]]\nid = "a"\nname = "A"\n[[publisher]]\nid = "A"\nname = "A2"\n',
         "publisher.1.id", "duplicate publisher id 'A'"),
        ('[[publisher]]\nid = "a"\nname = "A"\nkey = "x"\n', "publisher.0.key",
         "secrets never live"),
        ('[[publisher]]\nid = "a"\nname = "A"\nactive = true\n', "publisher.0.active",
         "unknown key"),
        ('[[publisher]]\nname = "A"\n', "publisher.0.id", "required key is missing"),
        ('[[publishers]]\nid = "a"\nname = "A"\n', "publishers", "unknown key"),
        ('[[publisher]]\nid = "a"\nname = "A"\nenabled = "no"\n', "publisher.0.enabled",
         "must be a boolean"),
        ("[[publisher]\n", "", "TOML syntax error"),
    ],
)
def test_broken_publishers_file(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    """The publisher registry reports mistakes like the connectors: file and field."""
    path = tmp_path / "publishers.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConnectorConfigError) as caught:
        load_publishers(path)
    assert (caught.value.path, caught.value.field) == (str(path), field)
    assert fragment in caught.value.message
    assert check_publishers(path)[0].field == field


def test_missing_publishers_file(tmp_path: Path) -> None:
    """A missing registry is an error naming the path."""
    with pytest.raises(ConnectorConfigError, match="cannot read"):
        load_publishers(tmp_path / "publishers.toml")


# ------------------------------------------------------------------------------- secrets


def _webhook(**fields: object) -> WebhookChannelConfig:
    return WebhookChannelConfig.model_validate(
        {"type": "webhook", "url": "https://h.example.invalid/", **fields}
    )


def test_resolve_secret_reads_several_secrets_from_the_environment() -> None:
    """A variable may hold several whsec_ secrets (rotation), separated by whitespace
    or commas; duplicates are dropped and order kept."""
    one, two = _whsec(), _whsec(64)
    cfg = _webhook(secret_env="ACME_SECRET")
    env = {"ACME_SECRET": f" {one},{two}\n{one} "}
    assert resolve_secret(cfg, "acme-ai", environ=env) == [one, two]


def test_resolve_secret_reads_a_file(tmp_path: Path) -> None:
    """A secret file holds the same format; a trailing newline is fine."""
    secret = _whsec()
    (tmp_path / "secret").write_text(secret + "\n", encoding="utf-8")
    cfg = _webhook(secret_file=str(tmp_path / "secret"))
    assert resolve_secret(cfg, "acme-ai") == [secret]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "is empty"),
        (" , ", "is empty"),
        (base64.b64encode(os.urandom(32)).decode(), "secret 1 of 1 in the environment variable "
         "ACME_SECRET does not start with whsec_"),
        ("whsec_!!!notbase64!!!", "is not base64 after whsec_"),
        ("whsec_" + base64.b64encode(b"short").decode(), "is 5 bytes; Standard Webhooks secrets "
         "are 24-64 bytes"),
        (_whsec() + " whsec_" + base64.b64encode(os.urandom(65)).decode(), "secret 2 of 2"),
    ],
)
def test_bad_secrets_are_config_errors_that_never_show_the_value(value: str, fragment: str) -> None:
    """A malformed secret is a ConfigError naming developer, channel and variable, and
    not containing any part of the secret."""
    cfg = _webhook(secret_env="ACME_SECRET")
    with pytest.raises(ConfigError) as caught:
        resolve_secret(cfg, "acme-ai", environ={"ACME_SECRET": value})
    message = str(caught.value)
    assert message.startswith("developer 'acme-ai', channel 'webhook': ")
    assert fragment in message
    for part in value.replace(",", " ").split():
        assert part.removeprefix("whsec_") not in message


def test_missing_secret_sources_name_the_variable_or_file(tmp_path: Path) -> None:
    """An unset variable or an absent file is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"environment variable ACME_SECRET .* is not set"):
        resolve_secret(_webhook(secret_env="ACME_SECRET"), "acme-ai", environ={})
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError, match=f"file {missing} does not exist"):
        resolve_secret(_webhook(secret_file=str(missing)), "acme-ai")


def test_resolve_token() -> None:
    """A registry token is read and stripped; one with inner whitespace is refused."""
    cfg = RegistryChannelConfig.model_validate(
        {"type": "registry", "base_url": "https://r.example.invalid/", "token_env": "TOKEN"}
    )
    assert resolve_token(cfg, "dataloom", environ={"TOKEN": " abc.def \n"}) == "abc.def"
    with pytest.raises(ConfigError, match="whitespace"):
        resolve_token(cfg, "dataloom", environ={"TOKEN": "abc\r\nX-Evil: 1"})
    with pytest.raises(ConfigError, match="is empty"):
        resolve_token(cfg, "dataloom", environ={"TOKEN": "  "})
    with pytest.raises(ConfigError, match=r"developer 'dataloom'.*variable TOKEN"):
        resolve_token(cfg, "dataloom", environ={})


def test_check_connectors_can_check_secrets(tmp_path: Path) -> None:
    """With check_secrets, missing or malformed secrets of enabled channels are
    reported against the channel's field; disabled channels are not checked."""
    path = _write(tmp_path, "acme-ai", _good() + '\n[[channel]]\ntype = "registry"\n'
                  'base_url = "https://r.example.invalid/"\ntoken_env = "T"\nenabled = false\n')
    assert check_connectors(tmp_path) == []
    errors = check_connectors(tmp_path, check_secrets=True, environ={"ACME_SECRET": "nope"})
    assert [(e.path, e.field) for e in errors] == [(str(path), "channel.0.secret_env")]
    assert "does not start with whsec_" in errors[0].message
    good = {"ACME_SECRET": _whsec()}
    assert check_connectors(tmp_path, check_secrets=True, environ=good) == []
