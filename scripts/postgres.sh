#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 for the test suite (make test runs it).
# Uses the server already there; else starts an installed Debian cluster; else installs Debian's
# postgresql package, starts it and gives the postgres role a password. The URL the tests should use
# is written to .venv/earmark-test-pg.url. Usage: scripts/postgres.sh
set -euo pipefail
cd "$(dirname "$0")/.."
url_file=.venv/earmark-test-pg.url
answers() { command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; }
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

if ! answers; then
    if ! command -v pg_ctlcluster >/dev/null; then
        echo "postgres: installing Debian's postgresql"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    fi
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    $SUDO pg_ctlcluster "$version" main start 2>/dev/null || $SUDO service postgresql start
    for _ in $(seq 30); do answers && break; sleep 1; done
fi
answers || { echo "postgres: no server answers on 127.0.0.1:5432" >&2; exit 1; }

if psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
    echo "postgresql://postgres@127.0.0.1:5432/postgres" > "$url_file"
else  # a stock install asks for a password over TCP: give the postgres role one for the tests
    $SUDO -u postgres psql -qc "ALTER USER postgres PASSWORD 'earmark-test'" >/dev/null
    echo "postgresql://postgres:earmark-test@127.0.0.1:5432/postgres" > "$url_file"
fi
echo "postgres: ok ($(cat "$url_file"))"
