#!/usr/bin/env bash
# Debian's PostgreSQL server binaries for the team-server test (tests/tracking/test_store.py):
# idempotent, non-interactive, quiet. Needs root, or sudo without a password. The test starts its
# own throwaway cluster with initdb/pg_ctl; the cluster Debian may create and start is not used.
set -euo pipefail

have_initdb() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if have_initdb; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! {
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 postgresql
} >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "install-postgres: apt-get install postgresql failed" >&2
    exit 1
fi
if ! have_initdb; then
    echo "install-postgres: postgresql installed but no /usr/lib/postgresql/*/bin/initdb" >&2
    exit 1
fi
initdb="$(compgen -G "/usr/lib/postgresql/*/bin/initdb" | sort -V | tail -n 1)"
"$initdb" --version
