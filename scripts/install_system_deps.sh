#!/usr/bin/env bash
# System packages the project's optional parts and tests need, installed with apt-get when
# missing (Debian/Ubuntu, as root or via sudo); elsewhere this prints what to install and goes on
# (the tests that need one then fail with that same one-line message):
#   libibverbs1  Mooncake's non-CUDA build links it even for TCP (the mooncake backend)
#   prometheus   the dashboard test scrapes a real stack with it (deploy/grafana/pdserve.json)
set -uo pipefail
missing=()
ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1' || missing+=(libibverbs1)
command -v prometheus >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null && SUDO="sudo -n"
fi
if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq >/dev/null 2>&1 \
             && $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; } \
        && exit 0
fi
echo "warning: missing system packages: ${missing[*]} (Debian/Ubuntu: apt-get install ${missing[*]});" \
     "the mooncake backend needs libibverbs1, the dashboard test prometheus" >&2
exit 0
