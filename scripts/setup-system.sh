#!/usr/bin/env bash
# System packages the test suite needs, from Debian's packages, installed only when
# missing: a Compose implementation (to validate docker-compose.yml), Java 17 (for the
# local Kafka broker) and PostgreSQL (the audit store's tests run against a real
# server, which scripts/localpg.py starts; only the binaries are needed, the
# package's own cluster is never used), and jemalloc, the allocator the worker runs on
# when it is installed (notice_relay.memory).
set -euo pipefail

need=()
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  need+=(docker-compose)
fi
if ! command -v java >/dev/null 2>&1; then
  need+=(openjdk-17-jre-headless)
fi
if ! command -v mvn >/dev/null 2>&1; then
  need+=(maven)
fi
# Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off PATH.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && ! command -v pg_ctl >/dev/null 2>&1 \
    && [ -z "${NOTICE_RELAY_PG_BINDIR:-}" ] && [ -z "${NOTICE_RELAY_TEST_POSTGRES_URL:-}" ]; then
  need+=(postgresql)
fi
if ! compgen -G '/usr/lib/*/libjemalloc.so.2' >/dev/null && ! compgen -G '/usr/lib*/libjemalloc.so.2' >/dev/null \
    && [ -z "${NOTICE_RELAY_JEMALLOC:-}" ]; then
  need+=(libjemalloc2)
fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "installing system packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
