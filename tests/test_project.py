"""The project's own promises: a small sorted public API, a valid compose file, and
CI running exactly the README's test command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import notice_relay

ROOT = Path(__file__).resolve().parent.parent


def test_public_api_is_sorted_and_complete() -> None:
    """`__all__` is sorted, and every name in it exists."""
    assert notice_relay.__all__ == sorted(notice_relay.__all__)
    for name in notice_relay.__all__:
        assert hasattr(notice_relay, name), name


def test_every_error_derives_from_the_base() -> None:
    """Every exception class the package exports derives from NoticeRelayError."""
    from notice_relay import errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 8
    assert all(issubclass(c, errors.NoticeRelayError) for c in classes)


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` (or docker-compose) accepts docker-compose.yml."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True,
                      check=False).returncode == 0 if shutil.which("docker") else False:
        cmd = ["docker", "compose", "-f", "docker-compose.yml", "config", "-q"]
    else:
        assert shutil.which("docker-compose"), "no Compose: run scripts/setup-system.sh"
        cmd = ["docker-compose", "-f", "docker-compose.yml", "config", "-q"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False, timeout=60)
    assert res.returncode == 0, res.stderr.decode()


def test_ci_runs_the_readme_test_command() -> None:
    """`.ci/run` runs `make test`, the README's test command, and nothing else."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "exec make test" in ci
    assert "make test" in readme
    assert "make demo" in readme
