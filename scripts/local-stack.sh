#!/usr/bin/env bash
# Starts the exporter's peers on this machine and writes .local.env for `cargo lambda watch`:
#   moto (the settings table with a stream, the token secret) on :5050,
#   the Cloudflare KV emulator on :8787, the API-keys stand-in on :8788.
# Ctrl-C stops them all.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
MOTO_PORT=${MOTO_PORT:-5050} KV_PORT=${KV_PORT:-8787} KEYS_PORT=${KEYS_PORT:-8788}
TABLE=local-EcomIndexSettingsTable SECRET=local/CloudFlareApiToken TOKEN=local-token

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# The same build as `make bins` (every binary, one feature set): nothing to do after it.
cargo build --locked --workspace --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
.venv/bin/moto_server -H 127.0.0.1 -p "$MOTO_PORT" >/tmp/ecom-moto.log 2>&1 & pids+=($!)
"$target_dir"/debug/ecom-emulators kv --port "$KV_PORT" --token "$TOKEN" \
  --namespace settings --namespace qcfg & pids+=($!)
"$target_dir"/debug/ecom-emulators api-keys --port "$KEYS_PORT" --key acct-1=local-marqo-key & pids+=($!)

export AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=eu-west-1 AWS_DEFAULT_REGION=eu-west-1
for _ in $(seq 1 100); do curl -sf "$AWS_ENDPOINT_URL/moto-api/" >/dev/null && break; sleep 0.1; done
.venv/bin/python - "$TABLE" "$SECRET" "$TOKEN" <<'PY'
import sys, boto3
table, secret, token = sys.argv[1:]
ddb = boto3.client("dynamodb")
ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
    StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"})
# The function's own ledger table (the scheduled reconcile keeps its passes there).
ddb.create_table(TableName=table + "-ledger", BillingMode="PAY_PER_REQUEST",
    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}])
boto3.client("secretsmanager").create_secret(Name=secret, SecretString=token)
# Sample data for the manual payloads in events/: the index of stream-insert.json and an override.
import json
sample = json.load(open("events/stream-insert.json"))["Records"][0]["dynamodb"]["NewImage"]
ddb.put_item(TableName=table, Item=sample)
ddb.put_item(TableName=table, Item=json.load(open("events/stream-query-config.json"))["Records"][0]["dynamodb"]["NewImage"])
PY

cat > .local.env <<ENV
AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
AWS_ACCESS_KEY_ID=testing
AWS_SECRET_ACCESS_KEY=testing
AWS_REGION=eu-west-1
SETTINGS_TABLE_NAME=$TABLE
LEDGER_TABLE_NAME=$TABLE-ledger
CLOUDFLARE_ACCOUNT_ID=local-cf-account
CLOUDFLARE_KV_NAMESPACE_ID=settings
CLOUDFLARE_QCFG_NAMESPACE_ID=qcfg
CLOUDFLARE_API_TOKEN_SECRET_ID=$SECRET
CLOUDFLARE_API_BASE_URL=http://127.0.0.1:$KV_PORT/client/v4
API_KEYS_SERVICE_URL=http://127.0.0.1:$KEYS_PORT/cells/{cell}
# The stream the sample events in events/ come from: records of any other source are rejected.
SETTINGS_TABLE_STREAM_ARN=arn:aws:dynamodb:eu-west-1:123456789012:table/dev-EcomIndexSettingsTable/stream/2026-11-21T00:00:00.000
ENV
cat <<MSG

Local stack up (table seeded with acct-1/products); settings in .local.env. In another terminal:
  $target_dir/debug/ecom-emulators invoke --env-file .local.env     # the function on :9000
and in a third, the migration first (the stream waits until the ledger's references are
complete, docs/operations.md "Migrating a table that holds indexes"), then anything:
  $target_dir/debug/ecom-settings-ctl --function-name ecom-settings-exporter --local backfill
  $target_dir/debug/ecom-settings-ctl --function-name ecom-settings-exporter --local reconcile --repair
  curl -s localhost:9000/2015-03-31/functions/ecom-settings-exporter/invocations -d @events/stream-insert.json
  curl -s localhost:$KV_PORT/__emulator/namespaces     # what KV holds
Ctrl-C here stops everything.
MSG
wait
