#!/usr/bin/env bash
# Chromium (and fonts for Korean text and emoji) for the browser tests, from Debian's packages.
#
# A developer's machine with them installed is left alone. On CI (CI set) or with
# BROWSER_UPGRADE=1, an installed Chromium is brought up to the version the package registry
# serves today: an older browser left on a reused machine once hid a failing layout test, and
# users run the current one. Nothing is pinned.
# Says so and succeeds when it cannot install, so the browser tests then skip with that reason.
set -uo pipefail
PACKAGES=(chromium fonts-noto-cjk fonts-noto-color-emoji)

browser_version() {
  local bin
  bin=$(command -v chromium || command -v chromium-browser) || return 1
  "$bin" --version 2>/dev/null
}

all_installed() {
  command -v dpkg-query >/dev/null 2>&1 || { browser_version >/dev/null; return; }
  local pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || return 1
  done
}

if all_installed && [ -z "${CI:-}" ] && [ -z "${BROWSER_UPGRADE:-}" ]; then
  echo "install-browser: $(browser_version) (BROWSER_UPGRADE=1 to update it)"
  exit 0
fi
# shellcheck source=scripts/apt.sh
source "$(dirname "$0")/apt.sh"
if apt_install install-browser "the browser tests" "${PACKAGES[@]}"; then
  echo "install-browser: $(browser_version)"
fi
exit 0
