#!/usr/bin/env bash
# System libraries the optional transfer backends need: Mooncake's non-CUDA build links
# libibverbs even for TCP. Installed with apt-get when missing (Debian/Ubuntu, as root or via
# sudo); elsewhere this prints what to install and goes on (the mooncake tests will then fail
# with that same one-line message).
set -uo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1'; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null && SUDO="sudo -n"
fi
if command -v apt-get >/dev/null; then
    $SUDO apt-get install -y --no-install-recommends libibverbs1 >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y --no-install-recommends libibverbs1 >/dev/null 2>&1; } \
        && exit 0
fi
echo "warning: libibverbs1 is missing and could not be installed; the mooncake backend needs it" \
     "(Debian/Ubuntu: apt-get install libibverbs1)" >&2
exit 0
