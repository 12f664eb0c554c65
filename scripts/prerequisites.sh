#!/usr/bin/env bash
# What `make demo`, `make test` and `make local` need on this machine beside the project's own
# files (which install everything else): each missing one is named on one line, with how to get
# it (Debian's package names), and the script exits 1. `prerequisites.sh test`: also node and npm
# (make test runs a Worker in workerd, installed from npm).
# The Rust toolchain is the one rust-toolchain.toml pins. Where rustup lacks it under that name but
# its `stable` is that very version (a machine that does not download toolchains), stable's
# directory is linked under the pinned name (`rustup toolchain link` refuses a version as a
# name): the same compiler, so the pin holds.
PYTHON=${PYTHON:-python3}
missing=0
need() { echo "missing: $1" >&2; missing=1; }

pinned=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$(dirname "$0")/../rust-toolchain.toml")
if ! command -v rustup >/dev/null; then
  need "rustup with Rust $pinned (rust-toolchain.toml): https://rustup.rs"
elif ! rustup toolchain list | grep -q "^$pinned-"; then
  if rustc +stable --version 2>/dev/null | grep -q "^rustc $pinned "; then
    echo "prerequisites: linking the machine's stable (Rust $pinned) as toolchain $pinned" >&2
    host=$(rustc +stable -vV | sed -n 's/^host: //p')
    ln -s "$(rustc +stable --print sysroot)" "$(rustup show home)/toolchains/$pinned-$host" ||
      need "Rust $pinned: rustup toolchain install $pinned"
  elif [ "${RUSTUP_AUTO_INSTALL:-1}" != 0 ]; then
    rustup toolchain install "$pinned" --profile minimal -c rustfmt,clippy >&2 ||
      need "Rust $pinned, the toolchain rust-toolchain.toml pins: rustup toolchain install $pinned"
  else
    need "Rust $pinned, the toolchain rust-toolchain.toml pins: rustup toolchain install $pinned"
  fi
fi
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
    need "node 20.18.1 or newer with npm (make test runs the edge Worker in workerd): https://nodejs.org or NodeSource's nodejs package"
  elif ! node -e 'const [a, b, c] = process.versions.node.split(".").map(Number);
                  process.exit(a > 20 || (a === 20 && (b > 18 || (b === 18 && c >= 1))) ? 0 : 1)'; then
    # The locked Miniflare's undici needs 20.18.1; Debian 12's nodejs is 18.
    need "node 20.18.1 or newer (node is $(node --version)): https://nodejs.org or NodeSource's nodejs package"
  fi
fi
exit $missing
