"""moto as this project runs it for measurements (`make scale`, `make bench`).

moto's table Query finds its partition by sorting every item of the table, which makes a batch
of many Queries (a shop-move batch, a reconcile pass) cost moto O(N^2) seconds. The patch hands
it the queried partition instead; what the function reads is unchanged.
"""

import threading


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


if __name__ == "__main__":
    # `python scripts/moto_patches.py -H HOST -p PORT`: moto's server, with the patch.
    import sys

    from moto.server import main

    partition_queries()
    main(sys.argv[1:])
