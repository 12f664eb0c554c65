#!/usr/bin/env bash
# Runs a command with a moto server (DynamoDB, DynamoDB Streams, Secrets Manager) on a free
# loopback port, and the AWS variables the SDK needs to use it. Stops moto when the command ends.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$here/.venv/bin/moto_server" ] || { echo "moto is not installed: run 'make venv'" >&2; exit 1; }

port=$("$here/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -t moto.XXXXXX.log)
# AWS_CALLS_RECORDING=FILE: moto records every request it answers there (moto's recorder), for
# scripts/check-permissions.py.
if [ -n "${AWS_CALLS_RECORDING:-}" ]; then
  mkdir -p "$(dirname "$AWS_CALLS_RECORDING")"
  : >"$AWS_CALLS_RECORDING"
  export MOTO_ENABLE_RECORDING=True MOTO_RECORDER_FILEPATH="$AWS_CALLS_RECORDING"
fi
# moto's server with scripts/moto_patches.py: its Query reads only the queried partition and its
# transactions copy only the items they touch (the same answers; fewer of moto's seconds, and no
# whole-table copy racing another request's write).
"$here/.venv/bin/python" "$here/scripts/moto_patches.py" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null || true; wait $moto_pid 2>/dev/null || true; rm -f "$log"' EXIT INT TERM

for _ in $(seq 1 100); do
  if "$here/.venv/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/')" 2>/dev/null; then
    break
  fi
  kill -0 $moto_pid 2>/dev/null || { echo "moto failed to start:" >&2; cat "$log" >&2; exit 1; }
  sleep 0.1
done

export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=eu-west-1
unset AWS_PROFILE AWS_SESSION_TOKEN
echo "moto on $AWS_ENDPOINT_URL" >&2
"$@"
