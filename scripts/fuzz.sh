#!/usr/bin/env bash
# Bounded fuzzing of record decoding and planning (`make fuzz`; not part of `make test`).
# Seeds come from events/. FUZZ_SECONDS per target (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
# Pinned, like every build tool the project installs.
CARGO_FUZZ_VERSION=0.13.2
cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\b" ||
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked

mkdir -p fuzz/corpus/decode_record fuzz/corpus/plan_batch
.venv/bin/python - <<'PY'
import glob, hashlib, json, os
for path in glob.glob("events/stream-*.json"):
    records = json.load(open(path))["Records"]
    def seed(target, value):
        data = json.dumps(value).encode()
        name = hashlib.sha1(data).hexdigest()
        open(os.path.join("fuzz/corpus", target, name), "wb").write(data)
    seed("plan_batch", records)
    for record in records:
        seed("decode_record", record)
PY
cd fuzz
for target in decode_record plan_batch; do
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096
done
