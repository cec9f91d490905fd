#!/usr/bin/env bash
# wscat (the npm package), for inspecting a relay and for tests/test_wscat.py, into build/tools.
# Installs Node.js and npm from Debian's packages first if they are missing. Says so and
# succeeds when it cannot, so the wscat test then skips with that reason.
set -uo pipefail
cd "$(dirname "$0")/.."
TOOLS=build/tools
if [ -x "$TOOLS/node_modules/.bin/wscat" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  fi
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "install-wscat: installing npm from Debian's packages"
    $SUDO apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null \
      || echo "install-wscat: apt-get could not install npm" >&2
  fi
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install-wscat: no npm here; the wscat test will skip" >&2
  exit 0
fi
mkdir -p "$TOOLS"
npm install --prefix "$TOOLS" --no-audit --no-fund --silent wscat@6 >/dev/null \
  || echo "install-wscat: npm could not install wscat; the wscat test will skip" >&2
exit 0
