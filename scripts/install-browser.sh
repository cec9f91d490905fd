#!/usr/bin/env bash
# Chromium (and fonts for Korean text and emoji) for the browser tests, from Debian's packages.
# Does nothing when Chromium is already there; says so and succeeds when it cannot install it,
# so the browser tests then skip with that reason.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
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
echo "install-browser: installing chromium from Debian's packages"
$SUDO apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
       chromium fonts-noto-cjk fonts-noto-color-emoji >/dev/null \
  || echo "install-browser: apt-get could not install chromium; the browser tests will skip" >&2
exit 0
