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
# shellcheck source=scripts/apt.sh
source "$(dirname "$0")/apt.sh"
# The package's post-install starts a system service where one can run; the tests do not use it.
if apt_install install-redis "the Redis tests" redis-server; then
  echo "install-redis: $(redis-server --version | cut -d' ' -f1-3)"
fi
exit 0
