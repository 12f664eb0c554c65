"""The source documents' per-record work in Python, for `make bench`'s comparison: parse the
event, decode each NewImage with boto3's TypeDeserializer, build the KV value the exporter
writes (the same fields), and json.dumps it. No network: only the CPU work is compared.

Usage: python bench/reference.py EVENT.json  ->  {"cpu_ms", "wall_ms", "peak_rss_mib"} on stdout.
"""
import json
import resource
import sys
import time
from decimal import Decimal

from boto3.dynamodb.types import TypeDeserializer


def plain(value):
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, set)):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        import base64
        return base64.b64encode(value).decode()
    return value


def main(path):
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with open(path, "rb") as f:
        event = json.loads(f.read())
    deserializer = TypeDeserializer()
    api_keys = {}
    bodies = []
    for record in event["Records"]:
        image = {k: deserializer.deserialize(v) for k, v in record["dynamodb"]["NewImage"].items()}
        image = plain(image)
        account, index = image["pk"], image["sk"][len("INDEX#"):]
        api_key = api_keys.setdefault(account, f"marqo-key-{account}")
        aliases = image.get("index_aliases") or {}
        value = {
            "schema_version": 1,
            "system_account_id": account,
            "index_name": index,
            "index_id": f"{account}-{index}",
            "shop_id": image.get("shop_id"),
            "marqo_api_key": api_key,
            "index_url": image["index_endpoint"],
            "search_config": image.get("search_config"),
            "collections_config": image.get("collections_config"),
            "feature_flags": image.get("feature_flags"),
            "agentic_config": image.get("agentic_config"),
            "pixel_id": image.get("pixel_id"),
            "index_aliases": {"doc_reads": aliases.get("doc_reads"), "analytics": aliases.get("analytics")},
            "query_override_sharding": image.get("query_override_sharding"),
        }
        text = json.dumps(value)
        for key in (image.get("shop_id"), f"{account}-{index}"):
            if key:
                bodies.append({"key": key, "value": text})
    body = json.dumps(bodies)
    cpu = (time.process_time() - cpu0) * 1000
    wall = (time.perf_counter() - wall0) * 1000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cpu_ms": cpu, "wall_ms": wall, "peak_rss_mib": peak, "body_bytes": len(body)}))


if __name__ == "__main__":
    main(sys.argv[1])
