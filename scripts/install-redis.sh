#!/usr/bin/env bash
# redis-server for the tests of the Redis state backend, from Debian's package.
#
# Left alone when it is already installed. Says so and succeeds when it cannot install, so those
# tests then skip with that reason. The tests start their own server on a free port; nothing is
# started here and no service is enabled.
set -uo pipefail

if command -v redis-server >/dev/null 2>&1; then
  echo "install-redis: $(redis-server --version | cut -d' ' -f1-3)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-redis: no apt-get here; install redis-server yourself or the Redis tests will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-redis: not root and no sudo; the Redis tests will skip" >&2
    exit 0
  fi
fi
echo "install-redis: installing redis-server from Debian's packages"
# The package's post-install starts a system service where one can run; the tests do not use it.
if $SUDO apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
       redis-server >/dev/null; then
  echo "install-redis: $(redis-server --version | cut -d' ' -f1-3)"
else
  echo "install-redis: apt-get could not install redis-server; the Redis tests will skip" >&2
fi
exit 0
