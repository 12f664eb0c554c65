"""check-permissions.py fails where it should: each test writes a recording made up for the
purpose (requests as moto's recorder writes them) and reads what the check says and its exit code.

Run: .venv/bin/python -m unittest scripts/test_check_permissions.py  (make test runs it)
"""
import contextlib
import importlib.util
import io
import json
import os
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "..", "template.yaml")
spec = importlib.util.spec_from_file_location("check_permissions", os.path.join(HERE, "check-permissions.py"))
check_permissions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_permissions)

SETTINGS = "settings-abc"
FUNCTION_AGENT = "aws-sdk-rust/1.3 os/linux lang/rust app/ecom-settings-exporter"


def request(target, body, agent=FUNCTION_AGENT, host="127.0.0.1:5000"):
    headers = {"Host": host, "User-Agent": agent}
    if target:
        headers["X-Amz-Target"] = target
    return {"headers": headers, "method": "POST", "url": f"http://{host}/", "body": json.dumps(body),
            "body_encoded": False}


def ddb(operation, body, **kw):
    return request(f"DynamoDB_20120810.{operation}", body, **kw)


TEST_AGENT = "aws-sdk-rust/1.3 os/linux lang/rust"
# What a test does before the function runs: its settings table, with a stream, and its secret.
CREATED = [
    ddb("CreateTable", {"TableName": SETTINGS, "StreamSpecification": {"StreamEnabled": True}}, agent=TEST_AGENT),
    request("secretsmanager.CreateSecret", {"Name": "dev/CloudFlareApiToken"}, agent=TEST_AGENT),
]
ALLOWED = [
    *CREATED,
    ddb("GetItem", {"TableName": SETTINGS + "-ledger", "Key": {}}),
    ddb("BatchGetItem", {"RequestItems": {SETTINGS: {}, SETTINGS + "-ledger": {}}}),
    ddb("TransactWriteItems", {"TransactItems": [{"Update": {"TableName": SETTINGS + "-ledger"}}]}),
    request("secretsmanager.GetSecretValue", {"SecretId": "dev/CloudFlareApiToken"}),
]


def run(entries, *flags):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = check_permissions.main([*flags, f.name, TEMPLATE])
    finally:
        os.unlink(f.name)
    return code, out.getvalue()


class CheckPermissions(unittest.TestCase):
    def test_calls_the_role_allows_pass(self):
        code, out = run(ALLOWED, "--calls-only")
        self.assertEqual(code, 0, out)
        self.assertIn("5 AWS calls of the function checked", out)  # BatchGetItem: one a table

    def test_the_tests_own_calls_are_not_the_functions(self):
        other = ddb("DeleteTable", {"TableName": SETTINGS}, agent="Boto3/1.35 md/Botocore")
        self.assertEqual(run(ALLOWED + [other], "--calls-only")[0], 0)

    def test_a_call_to_any_other_table_fails(self):
        code, out = run(ALLOWED + [ddb("GetItem", {"TableName": "payments", "Key": {}})], "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn("cannot attribute: dynamodb:GetItem on arn:aws:dynamodb:eu-west-1:123456789012:table/payments", out)

    def test_a_ledger_is_only_the_settings_tables_or_one_named(self):
        stray = ddb("PutItem", {"TableName": "other-ledger", "Item": {}})
        code, out = run(ALLOWED + [stray], "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn("cannot attribute: dynamodb:PutItem on", out)
        self.assertEqual(run(ALLOWED + [stray], "--calls-only", "--ledger", f"{SETTINGS}=other-ledger")[0], 0)
        second = ddb("PutItem", {"TableName": SETTINGS + "-upgraded-ledger", "Item": {}})
        self.assertEqual(run(ALLOWED + [second], "--calls-only")[0], 0)

    def test_an_index_not_granted_fails(self):
        query = ddb("Query", {"TableName": SETTINGS, "IndexName": "by-shop"})
        code, out = run(ALLOWED + [query], "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn(f"not allowed: dynamodb:Query on arn:aws:dynamodb:eu-west-1:123456789012:table/{SETTINGS}/index/by-shop", out)

    def test_an_action_not_granted_fails(self):
        code, out = run(ALLOWED + [ddb("DeleteItem", {"TableName": SETTINGS, "Key": {}})], "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn(f"not allowed: dynamodb:DeleteItem on arn:aws:dynamodb:eu-west-1:123456789012:table/{SETTINGS} (1 calls)", out)

    def test_a_transaction_is_checked_action_by_action(self):
        # The ledger's deletes are granted; the settings table's never are.
        deleting = ddb("TransactWriteItems", {"TransactItems": [
            {"Delete": {"TableName": SETTINGS + "-ledger"}}, {"Delete": {"TableName": SETTINGS}}]})
        code, out = run(ALLOWED + [deleting], "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn(f"not allowed: dynamodb:DeleteItem on arn:aws:dynamodb:eu-west-1:123456789012:table/{SETTINGS} (1 calls)", out)
        self.assertNotIn(f"table/{SETTINGS}-ledger", out)

    def test_a_call_without_a_target_fails(self):
        s3 = request(None, {}, host="bucket.s3.amazonaws.com")
        code, out = run(ALLOWED + [s3], "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn("cannot attribute: (no X-Amz-Target) on bucket.s3.amazonaws.com", out)

    def test_a_service_it_does_not_know_fails(self):
        code, out = run(ALLOWED + [request("AmazonSQS.SendMessage", {"QueueUrl": "q"})], "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn("cannot attribute: AmazonSQS:SendMessage on *", out)

    def test_a_secret_by_its_arn_passes_and_another_secret_fails(self):
        arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:"
        by_arn = request("secretsmanager.GetSecretValue", {"SecretId": arn + "dev/CloudFlareApiToken-x1Y2z3"})
        self.assertEqual(run(ALLOWED + [by_arn], "--calls-only")[0], 0)
        other = request("secretsmanager.GetSecretValue", {"SecretId": arn + "prod/db-AbCdEf"})
        code, out = run(ALLOWED + [other], "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn(f"cannot attribute: secretsmanager:GetSecretValue on {arn}prod/db-AbCdEf", out)

    def test_a_grant_no_call_made_fails(self):
        code, out = run(ALLOWED)
        self.assertEqual(code, 1)
        self.assertIn("granted but never called by any test: dynamodb:Scan (ReadSettingsTable)", out)

    def test_no_call_at_all_fails(self):
        code, out = run(CREATED, "--calls-only")
        self.assertEqual(code, 1)
        self.assertIn("no call of the function was recorded", out)


if __name__ == "__main__":
    unittest.main()
