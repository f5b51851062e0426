#!/usr/bin/env bash
# System packages the test suite needs, from Debian's packages, installed only when
# missing: a Compose implementation (to validate docker-compose.yml) and Java 17
# (for the local Kafka broker).
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
