#!/usr/bin/env bash
# Debian's Chromium for the MLflow UI test (tests/tracking/test_ui.py): idempotent, non-interactive, quiet.
# Needs root, or sudo without a password. No browser is downloaded outside the package manager.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
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
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 chromium
} >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "install-browser: apt-get install chromium failed" >&2
    exit 1
fi
/usr/bin/chromium --version 2>/dev/null
