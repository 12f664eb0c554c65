"""`make scale`: what each path costs as the fleet grows, measured against moto.

moto runs in this process behind a WSGI middleware that counts DynamoDB requests and the items
they read (Scan/Query `ScannedCount`, GetItem, BatchGetItem). The KV emulator and the API-keys
stand-in run as `ecom-emulators` processes; the release function runs behind `ecom-emulators
invoke` (the Lambda Invoke API over the runtime API), restarted for each path so its peak memory
is that path's. For each fleet size N (indexes, 4 per account, one override each or, with `--fleet
four-on-a-quarter`, four on every fourth index; items of about 1 KB) it measures:

- stream: one batch holding one REMOVE (NEW_AND_OLD_IMAGES);
- backfill: `{"mode": "backfill", "include_query_configs": true}` followed to the end;
- reconcile: `{"mode": "reconcile"}` over the whole fleet followed to the end (read only);
- verify: one index with `--overrides` overrides, `include_query_configs`;
- churn: N more indexes (each with its own shop) created through the stream, 1,000 INSERT records
  a batch, then removed, 1,000 REMOVE records a batch; then the ledger's items counted by kind
  beside the live fleet's indexes (what a fleet that creates and removes indexes keeps);
- sweep: N more indexes created so, then removed with their REMOVE records lost, then two
  whole-fleet reconcile repairs (`{"mode": "reconcile", "repair": true}`, as the schedule sends),
  the sweep marks aged by their wait between them; the ledger's items counted as for churn.

and prints items read, DynamoDB requests, KV requests, invocations, function CPU (user + system),
peak RSS and wall seconds, and what the path cost in dollars at list prices, from its own counts:
DynamoDB's request units (as DynamoDB charges them, from each request's and answer's items),
Cloudflare KV's operations (keys written, deleted and read, list requests), Lambda's GB-seconds
(the invocations' wall time at 512 MB) and invocations, and CloudWatch's log ingestion (every
byte the function printed, its EMF documents included; the custom metrics it published are a
monthly cost, printed once). Not part of `make test`: N = 20,000 takes minutes.
"""

import argparse
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import boto3

import moto_patches
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

REGION = "eu-west-1"
TOKEN = "scale-token"
STREAM_ARN = "arn:aws:dynamodb:eu-west-1:123456789012:table/scale/stream/2026-01-01T00:00:00.000"
# List prices of 2026-11-25, as emulators/src/bench/cost.rs has them (scripts/test_scale.py holds
# them equal): Cloudflare Workers Paid KV, DynamoDB on demand, Lambda arm64 and CloudWatch in us-east-1.
PRICES = {"kv_write": 5.00e-6, "kv_delete": 5.00e-6, "kv_read": 0.50e-6, "kv_list": 5.00e-6,
          "read_unit": 0.125e-6, "write_unit": 0.625e-6, "gb_second": 0.0000133334, "invocation": 0.20e-6,
          "log_byte": 0.50e-9, "metric_month": 0.30}


def units(operation, request, answer):
    """Read and write units as DynamoDB charges them, estimated from the items' sizes in DynamoDB
    JSON, as the bench's proxy (emulators/src/dynamo_proxy/accounting.rs) estimates them:
    an update counted by its key, a Query by the items it returns (scripts/test_scale.py holds
    the two equal on accounting.rs's own cases)."""
    import math
    size = lambda item: len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode())
    writes = lambda n: max(1.0, math.ceil(n / 1024))
    reads = lambda n, consistent: max(1.0, math.ceil(n / 4096)) * (1.0 if consistent else 0.5)
    consistent = request.get("ConsistentRead") is True
    if operation == "PutItem":
        return 0.0, writes(size(request.get("Item", {})))
    if operation in ("UpdateItem", "DeleteItem"):
        return 0.0, writes(size(request.get("Key", {})))
    if operation == "TransactWriteItems":
        actions = [next(iter(a.values())) for a in request.get("TransactItems", [])]
        return 0.0, sum(2 * writes(size(a.get("Item", a.get("Key", {})))) for a in actions)
    if operation == "BatchWriteItem":
        each = [r for rs in request.get("RequestItems", {}).values() for r in rs]
        return 0.0, sum(writes(size(r["PutRequest"]["Item"])) if "PutRequest" in r else 1.0 for r in each)
    if operation == "GetItem":
        return reads(size(answer.get("Item")), consistent), 0.0
    if operation == "BatchGetItem":
        return sum(reads(size(item), request.get("RequestItems", {}).get(t, {}).get("ConsistentRead") is True)
                   for t, items in answer.get("Responses", {}).items() for item in items), 0.0
    if operation in ("Query", "Scan"):
        return reads(sum(size(i) for i in answer.get("Items", [])), consistent), 0.0
    return 0.0, 0.0


class Counting:
    """DynamoDB requests and the items they read, as the function's requests reach moto."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.requests = 0
        self.items = 0
        self.by_operation = {}
        self.read_units = 0.0
        self.write_units = 0.0

    def snapshot(self):
        with self.lock:
            return self.requests, self.items, dict(self.by_operation)

    def units(self):
        with self.lock:
            return self.read_units, self.write_units

    def __call__(self, environ, start_response):
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target.startswith("DynamoDB_"):
            return self.app(environ, start_response)
        operation = target.split(".")[-1]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        sent = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(sent)
        body = b"".join(self.app(environ, start_response))
        read, read_units, write_units = 0, 0.0, 0.0
        try:
            answer = json.loads(body or b"{}")
            read_units, write_units = units(operation, json.loads(sent or b"{}"), answer)
            if "ScannedCount" in answer:
                read = answer["ScannedCount"]
            elif operation == "GetItem":
                read = 1 if "Item" in answer else 0
            elif operation == "BatchGetItem":
                read = sum(len(v) for v in answer.get("Responses", {}).values())
        except ValueError:
            pass
        with self.lock:
            self.requests += 1
            self.items += read
            self.read_units += read_units
            self.write_units += write_units
            self.by_operation[operation] = self.by_operation.get(operation, 0) + 1
        return [body]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    moto_patches.apply()
    counting = Counting(DomainDispatcherApplication(create_backend_app))
    port = free_port()
    server = make_server("127.0.0.1", port, counting, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", counting, server


def wait_for(url, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never answered")


def overrides_of(fleet, i):
    """How many overrides index `i` has: one each, or four on every fourth index (the same total,
    unevenly spread: the fleet issue 85 measured the backfill's memory on)."""
    if fleet == "four-on-a-quarter":
        return 4 if i % 4 == 0 else 0
    return 1


def seed(ddb, table, ledger, n, verify_overrides, fleet="one-each"):
    for name, stream in ((table, True), (ledger, False)):
        spec = dict(
            TableName=name,
            BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
        )
        if stream:
            spec["StreamSpecification"] = {"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"}
        ddb.create_table(**spec)
    index = index_item

    def override(account, i, q):
        return {
            "pk": {"S": account},
            "sk": {"S": f"INDEX#idx-{i}#QUERY#query {q}"},
            "query_config": {"M": {"boost": {"N": "2"}}},
        }

    items = []
    for i in range(n):
        account = f"acct-{i // 4:06d}"
        items += [index(account, i % 4)] + [override(account, i % 4, q) for q in range(overrides_of(fleet, i))]
    items += [override("acct-000000", 0, q) for q in range(max(1, overrides_of(fleet, 0)), verify_overrides)]
    write_items(ddb, table, [{"PutRequest": {"Item": item}} for item in items])
    return len(items)


def index_item(account, i):
    """An index's settings item of about 1 KB (as the issue measured), with its own shop."""
    return {
        "pk": {"S": account},
        "sk": {"S": f"INDEX#idx-{i}"},
        "index_endpoint": {"S": f"https://{account}-idx-{i}.idx.example"},
        "shop_id": {"S": f"{account}-shop-{i}.myshopify.com"},
        "search_config": {"M": {"limit": {"N": "20"}, "note": {"S": "x" * 700}}},
    }


def write_items(ddb, table, requests):
    for start in range(0, len(requests), 25):
        pending = {table: requests[start : start + 25]}
        while pending:
            pending = ddb.batch_write_item(RequestItems=pending).get("UnprocessedItems") or None


def churn(ddb, table, function, n, prefix="churn", lost=False):
    """N indexes created, then removed, through the stream, 1,000 records a batch (each item
    written or deleted first, as its record says); the invocations. `lost`: the REMOVE records
    never reach the function (the items are deleted all the same)."""
    items = [index_item(f"{prefix}-{i // 4:06d}", i % 4) for i in range(n)]
    invocations = 0
    for event, image in (("INSERT", "NewImage"), ("REMOVE", "OldImage")):
        if lost and event == "REMOVE":
            keys = [{"DeleteRequest": {"Key": {"pk": i["pk"], "sk": i["sk"]}}} for i in items]
            write_items(ddb, table, keys)
            break
        for start in range(0, n, 1000):
            batch = items[start : start + 1000]
            if event == "INSERT":
                write_items(ddb, table, [{"PutRequest": {"Item": item}} for item in batch])
            else:
                keys = [{"DeleteRequest": {"Key": {"pk": i["pk"], "sk": i["sk"]}}} for i in batch]
                write_items(ddb, table, keys)
            records = [{
                "eventID": str(start + at), "eventName": event, "eventVersion": "1.1",
                "eventSource": "aws:dynamodb", "awsRegion": REGION, "eventSourceARN": STREAM_ARN,
                "dynamodb": {"ApproximateCreationDateTime": time.time(), "SizeBytes": 1000,
                             "Keys": {"pk": item["pk"], "sk": item["sk"]}, image: item,
                             "SequenceNumber": f"{800000000000000000000 + 2 * start + at}",
                             "StreamViewType": "NEW_AND_OLD_IMAGES"},
            } for at, item in enumerate(batch)]
            answer = function.invoke({"Records": records})
            invocations += 1
            if answer != {"batchItemFailures": []}:
                raise SystemExit(f"churn {event}: {str(answer)[:300]}")
    return invocations


# How long a sweep mark waits (src/domain/settings.rs, SWEEP_AFTER_SECONDS).
SWEEP_AFTER_SECONDS = 1200


def sweep(ddb, table, function, n):
    """N indexes created through the stream and removed with their REMOVE records lost (their
    ledger items stay), then whole-fleet reconcile repairs followed to the end, as the schedule
    runs them: one that marks those items, and, once the marks are aged by the wait (no run
    waits 20 minutes), one that sweeps them; the invocations (the creation's included)."""
    invocations = churn(ddb, table, function, n, prefix="swept", lost=True)
    repair = {"mode": "reconcile", "repair": True}
    invocations += follow(function, repair)
    age_sweep_marks(ddb, table + "-ledger")
    return invocations + follow(function, repair)


def age_sweep_marks(ddb, ledger):
    """Every sweep mark moved back by the wait, as if that long had passed."""
    pages = ddb.get_paginator("scan").paginate(TableName=ledger, FilterExpression="attribute_exists(swept_at)")
    for page in pages:
        for item in page["Items"]:
            aged = int(item["swept_at"]["N"]) - SWEEP_AFTER_SECONDS
            ddb.update_item(TableName=ledger, Key={"pk": item["pk"], "sk": item["sk"]},
                            UpdateExpression="SET swept_at = :aged",
                            ExpressionAttributeValues={":aged": {"N": str(aged)}})


def live_indexes(ddb, table):
    """The settings table's indexes (their settings items)."""
    pages = ddb.get_paginator("scan").paginate(
        TableName=table, Select="COUNT", FilterExpression="begins_with(sk, :i) AND NOT contains(sk, :q)",
        ExpressionAttributeValues={":i": {"S": "INDEX#"}, ":q": {"S": "#QUERY#"}})
    return sum(page["Count"] for page in pages)


def ledger_census(ddb, ledger):
    """The ledger's items by kind: `ref#` (an index's own), `shop#` / `alias#` sets, their
    overflow items, the rest (`meta`, the reconcile's progress)."""
    kinds = {}
    for page in ddb.get_paginator("scan").paginate(TableName=ledger, ProjectionExpression="pk, sk"):
        for item in page["Items"]:
            pk, sk = item["pk"]["S"], item["sk"]["S"]
            kind = pk.split("#", 1)[0] if "#" in pk else "other"
            if kind in ("shop", "alias") and sk != "referrers":
                kind += " overflow"
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


class Function:
    """The release binary behind `ecom-emulators invoke`: invoked, measured, stopped."""

    def __init__(self, emulators, binary, env_file):
        self.port = free_port()
        self.process = subprocess.Popen(
            [emulators, "invoke", "--port", str(self.port), "--function", binary,
             "--env-file", env_file, "--timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        # What the function prints, as CloudWatch takes it in: bytes, and EMF's custom metrics.
        self.log_bytes, self.metrics, self.printing = 0, set(), threading.Lock()
        for stream in (self.process.stdout, self.process.stderr):
            threading.Thread(target=self.read, args=(stream,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/2015-03-31/functions/f/invocations"
        deadline = time.time() + 30
        self.pid = None
        while time.time() < deadline and self.pid is None:
            children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
                                      capture_output=True, text=True).stdout.split()
            self.pid = int(children[0]) if children else None
            time.sleep(0.05)
        if self.pid is None:
            raise SystemExit("the function did not start")
        self.slowest = 0.0  # the longest invocation followed, in seconds
        self.invoked = 0.0  # every invocation's seconds: Lambda's billed duration
        self.rss_after = []  # the process's peak RSS (MiB) after each invocation followed
        self.own_peaks = []  # each one's own peak (MiB): the peak is reset after each
        self.rss_now_after = []  # and its RSS then: what a warm container keeps between them
        self.peak = 0.0  # the process's peak across those resets

    def read(self, stream):
        for line in stream:
            metrics = set()
            start = line.find(b"{")
            if b'"_aws"' in line and start >= 0:
                try:
                    directives = json.loads(line[start:])["_aws"]["CloudWatchMetrics"]
                    metrics = {f"{m['Name']} by {json.dumps(d)}" for directive in directives
                               for d in directive["Dimensions"] for m in directive["Metrics"]}
                except (ValueError, KeyError, TypeError):
                    pass
            with self.printing:
                self.log_bytes += len(line)
                self.metrics |= metrics

    def printed(self):
        """Bytes printed so far, once the readers have caught up (nothing new for 50 ms)."""
        seen = -1
        for _ in range(100):
            with self.printing:
                now = self.log_bytes
            if now == seen:
                return now
            seen = now
            time.sleep(0.05)
        return seen

    def invoke(self, payload):
        for _ in range(100):
            try:
                request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), method="POST")
                started = time.time()
                with urllib.request.urlopen(request, timeout=200) as answer:
                    answer = json.loads(answer.read())
                self.invoked += time.time() - started
                return answer
            except ConnectionError:
                time.sleep(0.1)
            except urllib.error.URLError as e:
                if not isinstance(e.reason, ConnectionRefusedError):
                    raise
                time.sleep(0.1)
        raise SystemExit("the Invoke API never answered")

    def cpu_seconds(self):
        fields = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self, field="VmHWM:"):
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return 0.0

    def followed(self):
        """Notes an invocation's peak RSS, then resets it (Linux: `5` to `clear_refs`), so the
        next reading is the next invocation's own."""
        own = self.peak_rss_mib()
        self.peak = max(self.peak, own)
        self.rss_after.append(round(self.peak, 1))
        self.own_peaks.append(round(own, 1))
        self.rss_now_after.append(round(self.peak_rss_mib("VmRSS:"), 1))
        with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
            refs.write("5")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


def follow(function, payload):
    """Invokes until `complete`, passing the token on; the number of invocations."""
    invocations = 0
    while True:
        started = time.time()
        answer = function.invoke(payload)
        function.slowest = max(function.slowest, time.time() - started)
        function.followed()
        invocations += 1
        # A function error, or the Invoke API's own word (a timeout) instead of an answer.
        if not isinstance(answer, dict) or "errorType" in answer:
            raise SystemExit(f"{payload}: {answer}")
        if answer.get("complete", True) or invocations > 500:
            return invocations
        payload = dict(payload, continuation_token=answer["continuation_token"])


def kv_requests(kv_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{kv_port}/__emulator/requests") as answer:
        return json.loads(answer.read())


def kv_operations(requests):
    """Keys written, deleted and read, and list requests: what Cloudflare bills."""
    count = lambda *operations: sum(r["items"] for r in requests if r["operation"] in operations)
    reads = count("bulk/get") + sum(1 for r in requests if r["operation"] in ("values", "metadata"))
    lists = sum(1 for r in requests if r["operation"] == "keys")
    return {"written": count("bulk"), "deleted": count("bulk/delete"), "read": reads, "lists": lists}


def dollars(row):
    """What the path cost at list prices, by bill."""
    p, kv = PRICES, row["kv_operations"]
    return {
        "kv": kv["written"] * p["kv_write"] + kv["deleted"] * p["kv_delete"] + kv["read"] * p["kv_read"]
        + kv["lists"] * p["kv_list"],
        "dynamodb": row["read_units"] * p["read_unit"] + row["write_units"] * p["write_unit"],
        "lambda": row["invoked_seconds"] * 0.5 * p["gb_second"] + row["invocations"] * p["invocation"],
        "cloudwatch": row["log_bytes"] * p["log_byte"],
    }


def remove_record(account, i):
    keys = {"pk": {"S": account}, "sk": {"S": f"INDEX#idx-{i}"}}
    old = dict(keys, shop_id={"S": f"{account}-shop-{i}.myshopify.com"},
               index_endpoint={"S": "https://x.idx.example"})
    return {"Records": [{
        "eventID": "1", "eventName": "REMOVE", "eventVersion": "1.1", "eventSource": "aws:dynamodb",
        "awsRegion": REGION, "eventSourceARN": STREAM_ARN,
        "dynamodb": {"ApproximateCreationDateTime": time.time(), "Keys": keys, "OldImage": old,
                     "SequenceNumber": "900000000000000000001", "SizeBytes": 100,
                     "StreamViewType": "NEW_AND_OLD_IMAGES"},
    }]}


def measure(name, n, counting, kv_port, emulators, binary, env_file, run):
    function = Function(emulators, binary, env_file)
    function.invoke({"mode": "verify", "system_account_id": "warm", "index_name": "up"})  # cold start
    requests0, items0, ops0 = counting.snapshot()
    (read0, write0), printed0, invoked0 = counting.units(), function.printed(), function.invoked
    kv0, cpu0, started = len(kv_requests(kv_port)), function.cpu_seconds(), time.time()
    invocations = run(function)
    seconds = time.time() - started
    requests1, items1, ops1 = counting.snapshot()
    (read1, write1), kv = counting.units(), kv_requests(kv_port)[kv0:]
    row = {
        "path": name, "n": n, "items_read": items1 - items0, "ddb_requests": requests1 - requests0,
        "ddb_by_operation": {k: v - ops0.get(k, 0) for k, v in ops1.items() if v != ops0.get(k, 0)},
        "read_units": read1 - read0, "write_units": write1 - write0,
        "kv_requests": len(kv), "kv_operations": kv_operations(kv), "invocations": invocations,
        "invoked_seconds": round(function.invoked - invoked0, 2), "log_bytes": function.printed() - printed0,
        "custom_metrics": sorted(function.metrics),
        "cpu_s": round(function.cpu_seconds() - cpu0, 3), "peak_rss_mib": round(max(function.peak, function.peak_rss_mib()), 1),
        "seconds": round(seconds, 2), "slowest_invocation_s": round(function.slowest or seconds, 2),
        "peak_rss_after_each_mib": function.rss_after, "peak_rss_of_each_mib": function.own_peaks,
        "rss_after_each_mib": function.rss_now_after,
    }
    row["dollars"] = {k: round(v, 6) for k, v in dollars(row).items()}
    function.stop()
    print(json.dumps(row), flush=True)
    return row


def main():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per moto request otherwise
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--function", default="target/release/ecom-settings-exporter")
    parser.add_argument("--emulators", default="target/debug/ecom-emulators")
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--overrides", type=int, default=1000, help="overrides of the verified index")
    parser.add_argument("--fleet", default="one-each", choices=["one-each", "four-on-a-quarter"],
                        help="how the fleet's overrides are spread: one per index, or four on every fourth")
    parser.add_argument("--out", default="target/scale/results.json")
    parser.add_argument("--skip", default="", help="paths to leave out, comma-separated (e.g. 'reconcile x2 (warm)')")
    args = parser.parse_args()

    endpoint, counting, server = start_moto()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION=REGION,
                      AWS_DEFAULT_REGION=REGION)
    ddb = boto3.client("dynamodb", endpoint_url=endpoint)
    boto3.client("secretsmanager", endpoint_url=endpoint).create_secret(Name="scale/token", SecretString=TOKEN)
    kv_port, keys_port = free_port(), free_port()
    peers = [
        subprocess.Popen([args.emulators, "kv", "--port", str(kv_port), "--token", TOKEN,
                          "--namespace", "settings", "--namespace", "qcfg"], stdout=subprocess.DEVNULL),
        subprocess.Popen([args.emulators, "api-keys", "--port", str(keys_port), "--key", "*=scale-key"],
                         stdout=subprocess.DEVNULL),
    ]
    rows = []
    try:
        wait_for(f"http://127.0.0.1:{kv_port}/__emulator/requests")
        for n in [int(s) for s in args.sizes.split(",")]:
            table = f"scale-{n}"
            started = time.time()
            items = seed(ddb, table, table + "-ledger", n, args.overrides, args.fleet)
            print(f"# N = {n}: seeded {items} items ({args.fleet}) in {time.time() - started:.0f} s",
                  file=sys.stderr, flush=True)
            env = tempfile.NamedTemporaryFile("w", suffix=".env", delete=False)
            env.write("\n".join([
                f"AWS_ENDPOINT_URL={endpoint}", "AWS_ACCESS_KEY_ID=testing", "AWS_SECRET_ACCESS_KEY=testing",
                f"AWS_REGION={REGION}", f"SETTINGS_TABLE_NAME={table}", f"LEDGER_TABLE_NAME={table}-ledger",
                "CLOUDFLARE_ACCOUNT_ID=scale", "CLOUDFLARE_KV_NAMESPACE_ID=settings",
                "CLOUDFLARE_QCFG_NAMESPACE_ID=qcfg", "CLOUDFLARE_API_TOKEN_SECRET_ID=scale/token",
                f"CLOUDFLARE_API_BASE_URL=http://127.0.0.1:{kv_port}/client/v4",
                f"API_KEYS_SERVICE_URL=http://127.0.0.1:{keys_port}/cells/{{cell}}",
                f"SETTINGS_TABLE_STREAM_ARN={STREAM_ARN}", "CLOUDFLARE_REQUESTS_PER_5_MINUTES=1200",
                # Logs as the template deploys them: CloudWatch's bill counts their bytes.
                "AWS_LAMBDA_LOG_FORMAT=JSON", "AWS_LAMBDA_LOG_LEVEL=INFO",
            ]) + "\n")
            env.close()
            common = (counting, kv_port, args.emulators, args.function, env.name)
            backfill = {"mode": "backfill", "include_query_configs": True}
            paths = [
                ("backfill", None, lambda f: follow(f, backfill)),
                # Two backfills in one warm process: what a warm container keeps between them.
                ("backfill x2 (warm)", None, lambda f: follow(f, backfill) + follow(f, backfill)),
                # The item goes first, as its record says: the function exports each record's
                # item as the table holds it (not counted: outside the measure).
                ("stream REMOVE",
                 lambda: ddb.delete_item(TableName=table, Key={"pk": {"S": "acct-000001"}, "sk": {"S": "INDEX#idx-1"}}),
                 lambda f: (f.invoke(remove_record("acct-000001", 1)), 1)[1]),
                ("reconcile", None, lambda f: follow(f, {"mode": "reconcile"})),
                # Two passes in one warm process: peak memory stays that of one piece.
                ("reconcile x2 (warm)", None,
                 lambda f: follow(f, {"mode": "reconcile"}) + follow(f, {"mode": "reconcile"})),
                # After the backfill: the churn's indexes are the stream's alone.
                ("churn", None, lambda f: churn(ddb, table, f, n)),
                ("sweep", None, lambda f: sweep(ddb, table, f, n)),
                ("verify", None, lambda f: (f.invoke({"mode": "verify", "system_account_id": "acct-000000",
                                                      "index_name": "idx-0", "include_query_configs": True}), 1)[1]),
            ]
            for name, before, run in paths:
                if name not in args.skip.split(","):
                    if before:
                        before()
                    census = ledger_census(ddb, table + "-ledger") if name in ("churn", "sweep") else None
                    rows.append(measure(name, n, *common, run))
                    if census is not None:
                        rows[-1].update(ledger_items_before=census, live_indexes=live_indexes(ddb, table),
                                        ledger_items=ledger_census(ddb, table + "-ledger"))
                        print(json.dumps({k: rows[-1][k] for k in ("ledger_items_before", "ledger_items",
                                                                   "live_indexes")}), flush=True)
            os.unlink(env.name)
    finally:
        for peer in peers:
            peer.terminate()
        server.shutdown()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    json.dump(rows, open(args.out, "w"), indent=1)
    print("\n| path | N | items read | DynamoDB requests | KV requests | invocations | CPU s | peak RSS MiB "
          "| seconds | slowest invocation s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['n']:,} | {r['items_read']:,} | {r['ddb_requests']:,} | {r['kv_requests']:,} | "
              f"{r['invocations']} | {r['cpu_s']} | {r['peak_rss_mib']} | {r['seconds']} | "
              f"{r['slowest_invocation_s']} |")
    print("\n| path | N | KV written / deleted / read / lists | read units | write units | invoked s | log bytes "
          "| KV $ | DynamoDB $ | Lambda $ | CloudWatch $ | total $ |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kv, d = r["kv_operations"], r["dollars"]
        print(f"| {r['path']} | {r['n']:,} | {kv['written']:,} / {kv['deleted']:,} / {kv['read']:,} / {kv['lists']:,} | "
              f"{r['read_units']:,.0f} | {r['write_units']:,.0f} | {r['invoked_seconds']} | {r['log_bytes']:,} | "
              f"{d['kv']:.4f} | {d['dynamodb']:.4f} | {d['lambda']:.4f} | {d['cloudwatch']:.6f} | "
              f"{sum(d.values()):.4f} |")
    for r in (r for r in rows if "ledger_items" in r):
        kinds = lambda census: ", ".join(f"{k} {v:,}" for k, v in sorted(census.items()))
        how = "removed" if r["path"] == "churn" else "removed unseen by the stream, then two reconcile repairs"
        print(f"\nLedger ({r['path']}), N = {r['n']:,}: {sum(r['ledger_items_before'].values()):,} items before "
              f"{r['n']:,} indexes were created and {how} ({kinds(r['ledger_items_before'])}), "
              f"{sum(r['ledger_items'].values()):,} after ({kinds(r['ledger_items'])}); "
              f"the live fleet {r['live_indexes']:,} indexes")
    metrics = sorted({m for r in rows for m in r["custom_metrics"]})
    print(f"\nCustom metrics published: {len(metrics)} (${len(metrics) * PRICES['metric_month']:.2f} a month, "
          f"whatever the fleet): {', '.join(metrics)}")
    plot(rows)


def plot(rows):
    """Items read per path as N grows, on a log scale: a flat bar does not grow with the fleet."""
    import math
    top = max((r["items_read"] for r in rows), default=1) or 1
    print("\nitems read (log scale)")
    for r in rows:
        width = int(40 * math.log10(1 + r["items_read"]) / math.log10(1 + top))
        print(f"{r['path']:>20} {r['n']:>7,} |{'#' * width} {r['items_read']:,}")


if __name__ == "__main__":
    main()
