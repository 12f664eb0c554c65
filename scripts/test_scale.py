"""scale.py prices and counts as the bench does: its prices are emulators/src/bench/cost.rs's, and
its request units are emulators/src/dynamo_proxy/accounting.rs's on that file's own cases (the
same rule in two languages, held equal here).

Run: .venv/bin/python -m unittest scripts/test_scale.py  (make test runs it)
"""
import importlib.util
import json
import os
import re
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
spec = importlib.util.spec_from_file_location("scale", os.path.join(HERE, "scale.py"))
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)


class SameAsTheBench(unittest.TestCase):
    def test_the_prices_are_cost_rs(self):
        with open(os.path.join(HERE, "..", "emulators", "src", "bench", "cost.rs")) as f:
            source = f.read()
        block = source[source.index("pub const PRICES: Prices = Prices {"):]
        block = block[: block.index("};")]
        rust = {}
        for name, value in re.findall(r"(\w+): ([0-9._]+(?: / [0-9.e]+)?),", block):
            number, _, per = value.replace("_", "").partition(" / ")
            rust[name] = float(number) / (float(per) if per else 1.0)
        names = {"kv_write": "kv_write", "kv_delete": "kv_delete", "kv_read": "kv_read", "kv_list": "kv_list",
                 "dynamo_read_unit": "read_unit", "dynamo_write_unit": "write_unit",
                 "lambda_gb_second": "gb_second", "lambda_invocation": "invocation",
                 "logs_ingested_byte": "log_byte", "custom_metric_month": "metric_month"}
        self.assertEqual(sorted(rust), sorted(names))
        for name, ours in names.items():
            self.assertAlmostEqual(scale.PRICES[ours], rust[name], delta=rust[name] * 1e-9, msg=name)

    def test_the_units_are_accounting_rs_on_its_own_cases(self):
        put = {"TableName": "t", "Item": {"pk": {"S": "x" * 1500}}}
        self.assertEqual(scale.units("PutItem", put, {}), (0.0, 2.0))
        query = {"TableName": "t", "ConsistentRead": False}
        answer = json.loads('{"Items": [{"pk": {"S": "a"}}, {"pk": {"S": "b"}}]}')
        self.assertEqual(scale.units("Query", query, answer), (0.5, 0.0))
        batch = {"RequestItems": {"t": [{"PutRequest": {"Item": {"pk": {"S": "a"}}}}, {"DeleteRequest": {"Key": {}}}]}}
        self.assertEqual(scale.units("BatchWriteItem", batch, {}), (0.0, 2.0))
        transaction = {"TransactItems": [
            {"Put": {"TableName": "t", "Item": {"pk": {"S": "a"}, "v": {"S": "x" * 1500}}}},
            {"Update": {"TableName": "t", "Key": {"pk": {"S": "b"}}}}]}
        self.assertEqual(scale.units("TransactWriteItems", transaction, {}), (0.0, 6.0))
        # Sizes in bytes, as Rust counts them: 4,000 two-byte characters are two read units.
        wide = {"Item": {"pk": {"S": "é" * 2100}}}
        self.assertEqual(scale.units("GetItem", {"ConsistentRead": True}, wide), (2.0, 0.0))


if __name__ == "__main__":
    unittest.main()
