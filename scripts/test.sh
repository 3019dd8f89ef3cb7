#!/usr/bin/env bash
# Installs everything the test suite needs (idempotent), then runs it.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15 postgresql-client-15)
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
command -v go >/dev/null || need_apt+=(golang-go)
[ -d /usr/share/gocode/src/github.com/jackc/pgx ] || need_apt+=(golang-github-jackc-pgx-v4-dev)
command -v javac >/dev/null || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need_apt+=(maven)
command -v node >/dev/null || need_apt+=(nodejs npm)
# Debian's exporter scrapes the admin console in tests/test_metrics.py
[ -x /usr/bin/prometheus-pgbouncer-exporter ] || need_apt+=(prometheus-pgbouncer-exporter)
# tests/test_timeouts.py freezes a port with iptables (packets dropped, so nothing is acknowledged)
command -v iptables >/dev/null || need_apt+=(iptables)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# pgJDBC for the Java driver test, from Maven Central (the version tests/test_drivers.py names).
[ -f "$HOME/.m2/repository/org/postgresql/postgresql/42.7.13/postgresql-42.7.13.jar" ] \
    || mvn -q dependency:get -Dartifact=org.postgresql:postgresql:42.7.13
# A Debian postgresql install starts a cluster on 5432; the tests make their own.
python3 -m pip install -q --disable-pip-version-check -e '.[test,dev,bench]'
ruff check pgdoorman tests bench
mypy pgdoorman
python3 -c 'import pgdoorman.protocol.scan as s, sys; sys.exit(not s.COMPILED)' \
    || { echo "the compiled frame scanner did not build"; exit 1; }
python3 -c 'import pgdoorman.metrics.account as a, sys; sys.exit(not a.COMPILED)' \
    || { echo "the compiled accounting did not build"; exit 1; }
# The pure-Python twin of the compiled scanner must pass the same pooler tests; this pass also runs
# them with one worker process (the main pass uses the default: one worker per core, here 2).
PGDOORMAN_PURE_PYTHON=1 PGDOORMAN_TEST_WORKERS=1 python3 -m pytest -q -p no:cacheprovider tests/test_core_*.py tests/test_prepared.py tests/test_admin.py
# The differential fuzzer generates every feature (PGDOORMAN_FUZZ_SKIP=a,b looks past a known bug).
exec python3 -m pytest -q -p no:cacheprovider "$@"
