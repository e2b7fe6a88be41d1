#!/usr/bin/env bash
# The system (Debian) packages that the test suite drives for real: a PostgreSQL server (the job
# store's second database) and headless Chromium with its WebDriver (the dashboard's browser tests).
# Installed only when missing, and only where apt-get can run (as root); elsewhere it says which
# are missing and the tests that need them skip with that reason.
set -euo pipefail
say() { echo "[setup] $*"; }

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "installing system packages: ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "not installed (needs root and apt-get): ${missing[*]}; the tests that need them will skip"
fi
