#!/usr/bin/env bash
# The deployed artifact, checked (make artifact-check):
#   artifact.sh check BOOTSTRAP   it is an aarch64 ELF (what `Architectures: [arm64]` runs), and
#                                 a `bootstrap-here` beside its folder runs it on this machine:
#                                 itself on aarch64, under qemu-user elsewhere.
set -euo pipefail
[ "${1:-}" = check ] && [ -n "${2:-}" ] || { echo "usage: $0 check BOOTSTRAP" >&2; exit 2; }
bootstrap=$(realpath "$2")
# ELF header: magic, 64-bit class (byte 4 = 2), e_machine at byte 18 = 183 (EM_AARCH64).
header=$(od -An -tu1 -N20 "$bootstrap" | tr -s ' \n' ' ')
read -r -a bytes <<<"$header"
if [ "${bytes[0]} ${bytes[1]} ${bytes[2]} ${bytes[3]}" != "127 69 76 70" ] || [ "${bytes[4]}" != 2 ] ||
   [ "${bytes[18]}" != 183 ] || [ "${bytes[19]}" != 0 ]; then
  echo "artifact: $bootstrap is not a 64-bit aarch64 ELF (header: $header)" >&2
  exit 1
fi
echo "artifact: $bootstrap is an aarch64 ELF, $(stat -c %s "$bootstrap") bytes"
here="$(dirname "$(dirname "$bootstrap")")/bootstrap-here"
if [ "$(uname -m)" = aarch64 ]; then
  printf '#!/bin/sh\nexec %q "$@"\n' "$bootstrap" >"$here"
else
  command -v qemu-aarch64-static >/dev/null && [ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || {
    echo "artifact: running it here needs qemu-user: apt-get install qemu-user-static libc6-arm64-cross libgcc-s1-arm64-cross" >&2
    exit 1
  }
  printf '#!/bin/sh\nexec qemu-aarch64-static -L /usr/aarch64-linux-gnu %q "$@"\n' "$bootstrap" >"$here"
fi
chmod +x "$here"
