#!/usr/bin/env bash
# System packages pdserve uses, each installed with apt-get when missing (Debian/Ubuntu, as root
# or via sudo); elsewhere this prints what to install and goes on (the tests that need one then
# fail with that same one-line message):
#   libibverbs1  - Mooncake's non-CUDA build links libibverbs even for TCP;
#   etcd-server  - the discovery store (`--discovery etcd://...`): `etcd` on PATH, which the
#                  discovery tests and `pdserve launch --discovery` start;
#   prometheus   - the dashboard test scrapes a real stack with it (deploy/grafana/pdserve.json).
set -uo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null && SUDO="sudo -n"
fi
UPDATED=0

apt_install() {  # apt_install PACKAGE: 0 when installed
    command -v apt-get >/dev/null || return 1
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y --no-install-recommends "$1" >/dev/null 2>&1 && return 0
    if [ "$UPDATED" = "0" ]; then
        UPDATED=1
        $SUDO apt-get update -qq >/dev/null 2>&1 || return 1
        $SUDO apt-get install -y --no-install-recommends "$1" >/dev/null 2>&1 && return 0
    fi
    return 1
}

if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1'; then
    apt_install libibverbs1 || echo "warning: libibverbs1 is missing and could not be installed; the" \
        "mooncake backend needs it (Debian/Ubuntu: apt-get install libibverbs1)" >&2
fi
if ! command -v etcd >/dev/null; then
    apt_install etcd-server || echo "warning: etcd is missing and could not be installed; discovery" \
        "(--discovery etcd://...) and its tests need it (Debian/Ubuntu: apt-get install etcd-server)" >&2
fi
if ! command -v prometheus >/dev/null; then
    apt_install prometheus || echo "warning: prometheus is missing and could not be installed; the dashboard" \
        "test needs it (Debian/Ubuntu: apt-get install prometheus)" >&2
fi
exit 0
