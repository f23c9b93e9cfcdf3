#!/usr/bin/env bash
# Tools the tests and benchmarks drive from outside Python: `hey`, the compiled HTTP load generator (Debian
# package `hey`). Installed with apt where this user may (root); elsewhere the tests that need it say so.
set -uo pipefail
if command -v hey >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_tools: hey is not installed and apt-get cannot run here; tests that need it are skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q hey >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q hey >/dev/null; } \
    || echo "install_tools: apt-get could not install hey; tests that need it are skipped" >&2
command -v hey >/dev/null 2>&1 && echo "install_tools: installed $(command -v hey)"
exit 0
