"""moto as this project runs it (`scripts/with-moto.sh`: make test, make bench; make scale).

Two of moto's ways cost it seconds that grow with the table, not the request: its table Query
finds its partition by sorting every item of the table (a batch of many Queries, a reconcile pass:
O(N^2)), and its TransactWriteItems deep-copies every table an action touches, once per action, in
case it must roll back (a transaction of 100 on a ledger of 10,000 items: 20 s). The patches hand
the Query its partition and keep a copy of only the items a transaction touches; what the function
reads and writes is unchanged (`python scripts/moto_patches.py --check` holds the transactions
equal to moto's own; make test runs it). The copies were also a fault: moto's server answers
requests on threads, and a table copied while another request wrote it failed with HTTP 500.
"""

import copy
import threading
import types


def partition_queries():
    """moto's table Query finds its partition by sorting every item of the table
    (`Table.all_items`), so a reconcile pass, a few thousand Queries of the ledger, costs O(N^2)
    there (over 35 minutes at 20,000 indexes). Hand it the queried partition instead: the same
    items, which its Query then sorts by range key and pages as before, so what the function reads
    and every count here are unchanged; only moto's seconds shrink."""
    from moto.dynamodb.models.table import Table

    local = threading.local()
    all_items, query = Table.all_items, Table.query

    def partition_items(self):
        partition = getattr(local, "partition", None)
        if partition is None:
            return all_items(self)
        return list(self.items[partition].values()) if partition in self.items else []

    def partition_query(self, hash_key, range_comparison, range_objs, limit, exclusive_start_key,
                        scan_index_forward, projection_expressions, index_name=None, *rest, **kwargs):
        args = (hash_key, range_comparison, range_objs, limit, exclusive_start_key, scan_index_forward,
                projection_expressions, index_name, *rest)
        if index_name or hash_key is None or not self.range_key_attr:
            return query(self, *args, **kwargs)
        local.partition = hash_key
        try:
            return query(self, *args, **kwargs)
        finally:
            local.partition = None

    Table.all_items, Table.query = partition_items, partition_query


def item_snapshots():
    """moto's TransactWriteItems deep-copies each table an action touches, once per action, to
    put it back if the transaction is cancelled. For tables without a stream, keep a copy of only
    the items the actions name instead, and put those back: the same outcome (held equal to
    moto's own by `check`), in time that follows the transaction, not the table. A table with a
    stream keeps moto's way (putting it back also takes back the stream records it added)."""
    from moto.dynamodb import models
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.table import Table

    local = threading.local()

    def deepcopy(value, memo=None):
        if getattr(local, "items_only", False) and isinstance(value, Table):
            return value
        return copy.deepcopy(value, memo)

    models.copy = types.SimpleNamespace(copy=copy.copy, deepcopy=deepcopy)
    transact = DynamoDBBackend.transact_write_items

    def touched(backend, actions):
        """(table, hash key, range key, a copy of the item or None) for each action's item."""
        for action in actions:
            for op in action.values():
                table = backend.tables.get(op.get("TableName") if isinstance(op, dict) else None)
                if table is None:
                    continue
                key = op.get("Key") or op.get("Item") or {}
                try:
                    hash_key, range_key = backend.get_keys_value(table, key)
                except Exception:
                    continue
                yield table, hash_key, range_key, copy.deepcopy(table.get_item(hash_key, range_key))

    def put_back(table, hash_key, range_key, item):
        partition = table.items[hash_key] if range_key is not None else table.items
        at = range_key if range_key is not None else hash_key
        if item is None:
            partition.pop(at, None)
        else:
            partition[at] = item
        if range_key is not None and not table.items[hash_key]:
            del table.items[hash_key]

    def transact_write_items(self, transact_items):
        saved = list(touched(self, transact_items[:100]))
        if any(table.stream_shard is not None for table, *_ in saved):
            return transact(self, transact_items)
        local.items_only = True
        try:
            return transact(self, transact_items)
        except Exception:
            for entry in reversed(saved):
                put_back(*entry)
            raise
        finally:
            local.items_only = False

    DynamoDBBackend.transact_write_items = transact_write_items


def apply():
    partition_queries()
    item_snapshots()


def check():
    """The same transactions (applied, cancelled by a condition, refused for naming one item
    twice) against moto as released and as patched: the tables must end equal."""
    import boto3
    from moto import mock_aws

    def run():
        with mock_aws():
            db = boto3.client("dynamodb", region_name="eu-west-1")
            db.create_table(TableName="t", BillingMode="PAY_PER_REQUEST",
                            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                       {"AttributeName": "sk", "KeyType": "RANGE"}],
                            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                                  {"AttributeName": "sk", "AttributeType": "S"}])
            key = lambda pk, sk="s": {"pk": {"S": pk}, "sk": {"S": sk}}
            add = lambda pk, members, room=5: {"Update": {
                "TableName": "t", "Key": key(pk), "UpdateExpression": "ADD m :m",
                "ConditionExpression": "attribute_not_exists(m) OR size(m) <= :room",
                "ExpressionAttributeValues": {":m": {"SS": members}, ":room": {"N": str(room)}}}}
            put = lambda pk, sk="s": {"Put": {"TableName": "t", "Item": {**key(pk, sk), "v": {"S": "1"}}}}
            delete = lambda pk, sk="s": {"Delete": {"TableName": "t", "Key": key(pk, sk)}}
            answers = []
            for actions in ([add("a", ["x", "y"]), put("b"), put("c", "z")],
                            [put("d"), delete("b"), add("e", ["v"]), add("a", ["w"], room=1)],
                            [put("f"), put("f")],
                            [delete("c", "z"), add("a", ["x"])]):
                try:
                    db.transact_write_items(TransactItems=actions)
                    answers.append("ok")
                except Exception as e:
                    answers.append(type(e).__name__)
            items = db.scan(TableName="t")["Items"]
            return answers, sorted(items, key=lambda i: (i["pk"]["S"], i["sk"]["S"]))

    released = run()
    item_snapshots()
    patched = run()
    assert released == patched and released[0][1] != "ok", f"moto as released: {released}\npatched: {patched}"
    print(f"moto_patches: transactions as moto's own ({released[0]})")


if __name__ == "__main__":
    # `python scripts/moto_patches.py -H HOST -p PORT`: moto's server, with the patches;
    # `--check`: the transaction patch held equal to moto's own.
    import sys

    if sys.argv[1:] == ["--check"]:
        check()
        sys.exit(0)

    from moto.server import main

    apply()
    main(sys.argv[1:])
