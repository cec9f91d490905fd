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
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here; install Chromium yourself or the browser tests will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-browser: not root and no sudo; the browser tests will skip" >&2
    exit 0
  fi
fi
echo "install-browser: installing or updating ${PACKAGES[*]} from Debian's packages"
# apt-get install also upgrades a package that is already there to the newest version listed.
if $SUDO apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
       "${PACKAGES[@]}" >/dev/null; then
  echo "install-browser: $(browser_version)"
else
  echo "install-browser: apt-get could not install chromium; the browser tests will skip" >&2
fi
exit 0
