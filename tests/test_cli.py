"""The command line, run as real processes: `validate` never answers bad input with a
traceback, `connectors check` names the broken file and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VALID = sorted((ROOT / "schemas" / "examples" / "valid").glob("*.json"))
INVALID = sorted((ROOT / "schemas" / "examples" / "invalid").glob("*.json"))


def run(
    *args: str, stdin: bytes | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[bytes]:
    """`notice-relay ARGS` as its own process, with the repo's registry files."""
    return subprocess.run([sys.executable, "-m", "notice_relay", *args], input=stdin,
                          capture_output=True, cwd=cwd, timeout=60, check=False)


def test_validate_valid_prints_normalized_notice() -> None:
    """A valid declaration: exit 0, the Notice v1 JSON on stdout, nothing on stderr."""
    res = run("validate", str(VALID[0]))
    assert res.returncode == 0, res.stderr
    notice = json.loads(res.stdout)
    assert notice["schema"] == "notice-relay/notice/v1"
    assert "contact_email" not in res.stdout.decode()


def test_validate_reads_stdin() -> None:
    """`-` reads the declaration from standard input."""
    res = run("validate", "-", stdin=VALID[0].read_bytes())
    assert res.returncode == 0
    assert json.loads(res.stdout)["notice_id"]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_validate_invalid_examples_exit_1_with_reasons(path: Path) -> None:
    """Every invalid example: exit 1, reasons on stderr, no traceback, nothing on stdout."""
    res = run("validate", str(path))
    assert res.returncode == 1
    assert res.stdout == b""
    err = res.stderr.decode()
    assert "invalid declaration" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("raw", [
    b"", b"\x00\x01\x02", b"\xff\xfe\xfd", b"not json", b"[]", b"null", b"42",
    b"[" * 100_000, b'{"a":' * 50_000, b'{"schema": "notice-relay/declaration/v1"}',
    b"\xef\xbb\xbf{}", b'"' + b"x" * 1000 + b'"',
], ids=lambda r: repr(r[:12]))
def test_validate_never_tracebacks(raw: bytes) -> None:
    """Whatever the bytes, `validate -` exits 1 with a reason and no traceback."""
    res = run("validate", "-", stdin=raw)
    assert res.returncode == 1, res.stderr
    assert b"Traceback" not in res.stderr
    assert res.stderr.strip()


def test_validate_huge_input_is_refused_by_size() -> None:
    """A 9 MB input is refused with the size named, not parsed."""
    res = run("validate", "-", stdin=b"{" + b" " * (9 * 1024 * 1024) + b"}")
    assert res.returncode == 1
    assert b"Traceback" not in res.stderr
    assert b"bytes" in res.stderr or b"MB" in res.stderr or b"MiB" in res.stderr


def test_validate_names_each_offending_field(tmp_path: Path) -> None:
    """Several broken fields are each named on stderr."""
    doc = json.loads(VALID[0].read_text())
    doc["artist"]["display_name"] = ""
    doc["uses"] = ["train-everything"]
    doc["all_work"] = True
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(doc))
    err = run("validate", str(f)).stderr.decode()
    for field in ("artist.display_name", "uses.0", "all_work"):
        assert field in err


def test_validate_missing_file_is_a_clear_error() -> None:
    """A file that does not exist: exit 1 and a message, no traceback."""
    res = run("validate", "/nonexistent/decl.json")
    assert res.returncode == 1
    assert b"cannot read" in res.stderr


def test_connectors_check_ok_on_examples() -> None:
    """The shipped connector examples and publisher registry check clean."""
    res = run("connectors", "check", "--json")
    assert res.returncode == 0, res.stdout
    assert json.loads(res.stdout)["ok"] is True


def test_connectors_check_names_file_and_field(tmp_path: Path) -> None:
    """A broken connector file: exit 1, and the error names the file and the field."""
    d = tmp_path / "connectors"
    d.mkdir()
    (d / "acme-ai.toml").write_text(
        'id = "acme-ai"\nname = "Acme"\naccepts = ["train-ai"]\n\n'
        '[[channel]]\ntype = "webhook"\nurl = "https://a.example.invalid/h"\n'
        'secret_env = "X"\ntimeout = "ten seconds"\n')
    (d / "other.toml").write_text('id = "other"\nname = "O"\naccepts = ["train-everything"]\n')
    res = run("connectors", "check", "--dir", str(d))
    assert res.returncode == 1
    err = res.stderr.decode()
    assert "acme-ai.toml" in err
    assert "channel.0.timeout" in err
    assert "other.toml" in err
    assert "accepts" in err


def test_publish_refuses_invalid_without_kafka(tmp_path: Path) -> None:
    """`publish` validates first: an invalid file publishes nothing (no Kafka needed)."""
    res = run("publish", str(INVALID[0]))
    assert res.returncode == 1
    assert b"nothing published" in res.stderr
