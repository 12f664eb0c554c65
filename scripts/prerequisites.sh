#!/usr/bin/env bash
# What `make demo`, `make test` and `make local` need on this machine beside the project's own
# files (which install everything else): each missing one is named on one line, with how to get
# it (Debian's package names), and the script exits 1. `prerequisites.sh test`: also node and npm
# (make test runs a Worker in workerd, installed from npm).
PYTHON=${PYTHON:-python3}
missing=0
need() { echo "missing: $1" >&2; missing=1; }

command -v cargo >/dev/null || need "cargo, the Rust toolchain: https://rustup.rs"
command -v cc >/dev/null || command -v gcc >/dev/null ||
  need "a C compiler (jemalloc and the AWS SDK's aws-lc-sys build C): apt-get install gcc"
command -v curl >/dev/null || need "curl (make local waits for moto with it): apt-get install curl"
if ! command -v "$PYTHON" >/dev/null; then
  need "$PYTHON, Python 3.9 or newer (moto runs in it): apt-get install python3"
elif ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
  need "Python 3.9 or newer ($PYTHON is $("$PYTHON" --version 2>&1)): apt-get install python3"
elif ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  need "Python's venv module (with ensurepip): apt-get install python3-venv"
fi
if [ "${1:-}" = test ]; then
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    need "node 18 or newer with npm (make test runs the edge Worker in workerd): apt-get install nodejs npm"
  elif ! node -e 'process.exit(parseInt(process.versions.node) < 18 ? 1 : 0)'; then
    need "node 18 or newer (node is $(node --version)): apt-get install nodejs"
  fi
fi
exit $missing
