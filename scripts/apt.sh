# Shared by the installers: Debian packages through apt-get, as root or through `sudo -n`.
#
# apt_install TOOL WHAT PACKAGE...
#   installs (or updates) the packages; on failure says why on stderr, naming TOOL and what
#   will skip without them (WHAT), and returns 1. Callers exit 0 either way: the tests that
#   need the packages skip, saying why.
apt_install() {
  local tool=$1 what=$2
  shift 2
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$tool: no apt-get here; install $* yourself or $what will skip" >&2
    return 1
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      echo "$tool: not root and no sudo; $what will skip" >&2
      return 1
    fi
  fi
  echo "$tool: installing or updating $* from Debian's packages"
  # apt-get install also upgrades a package that is already there to the newest version listed.
  if $sudo apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
    return 0
  fi
  echo "$tool: apt-get could not install $*; $what will skip" >&2
  return 1
}
