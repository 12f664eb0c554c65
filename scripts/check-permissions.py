"""Least privilege, checked: every AWS call the function made during the tests, as moto recorded
it (`AWS_CALLS_RECORDING`, see scripts/with-moto.sh), must be allowed by the role the template
gives the function, and every action the role grants the function's code must have been made by
some test.

The function's calls are the ones whose user agent names it (`app/ecom-settings-exporter`, set in
`build_exporter`); the tests' own calls (creating tables, writing items) are not the function's.
A call's table or secret is bound to the template's resource it stands for: a table named
`...-ledger` is `LedgerTable`, any other table is the `SettingsTableName` parameter, a secret is the
`CloudflareApiTokenSecretId` parameter; each statement's resource is then resolved with those
bindings and matched as IAM matches (`*`, `?`).

Usage: python scripts/check-permissions.py RECORDING.jsonl template.yaml  (exit 1 on a gap)
"""
import base64
import fnmatch
import json
import sys

from cfnlint.decode import cfn_yaml

APP = "app/ecom-settings-exporter"
ROLE = "ExporterRole"
PSEUDO = {"AWS::Partition": "aws", "AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012"}
# What Lambda itself does with the role (poll the stream, send to the failed-records queue, write
# the function's logs): not calls of the function's code, so no test makes them.
LAMBDA_OWN = {"ReadSettingsStream", "ListStreams", "ReportFailedRecords", "WriteOwnLogs"}


TRANSACT_ACTIONS = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                    "ConditionCheck": "ConditionCheckItem"}


def table_arn(name):
    return "arn:aws:dynamodb:eu-west-1:123456789012:table/" + name


def recorded(recording):
    """Each request moto recorded. Its threads append a request and its newline in two writes, so
    two requests can share a line: the documents are read one after another, not line by line."""
    with open(recording) as file:
        text = file.read()
    decoder, at = json.JSONDecoder(), 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return
        entry, at = decoder.raw_decode(text, at)
        yield entry


def calls_of_the_function(recording):
    """(action, resource ARN, bindings) of each call the function made."""
    for entry in recorded(recording):
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        agent = headers.get("x-amz-user-agent", "") + " " + headers.get("user-agent", "")
        if APP not in agent or "x-amz-target" not in headers:
            continue
        prefix, operation = headers["x-amz-target"].split(".", 1)
        body = entry.get("body") or "{}"
        if entry.get("body_encoded"):
            body = base64.b64decode(body).decode()
        request = json.loads(body or "{}")
        if prefix.startswith("DynamoDB_"):
            if operation == "TransactWriteItems":
                # IAM authorises each action of a transaction as the single-item call it is.
                calls = [(TRANSACT_ACTIONS[kind], action["TableName"])
                         for item in request["TransactItems"] for kind, action in item.items()]
            else:
                tables = [request["TableName"]] if "TableName" in request else list(request.get("RequestItems", {}))
                calls = [(operation, table) for table in tables]
            for operation, table in calls:
                param = "LedgerTable" if table.endswith("-ledger") else "SettingsTableName"
                yield "dynamodb:" + operation, table_arn(table), {param: table}
        elif prefix == "secretsmanager":
            secret = request["SecretId"]
            arn = secret if secret.startswith("arn:") else (
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:" + secret + "-AbCdEf")
            yield "secretsmanager:" + operation, arn, {"CloudflareApiTokenSecretId": secret}
        else:
            yield prefix + ":" + operation, "*", {}


def resolve(resource, bindings):
    """The statement's resource as an ARN pattern, or None where the bindings do not reach it."""
    if resource == "*":
        return "*"
    if isinstance(resource, str):
        return resource
    if "Fn::GetAtt" in resource:
        name, _ = resource["Fn::GetAtt"]
        return table_arn(bindings[name]) if name in bindings else None
    if "Ref" in resource:
        return bindings.get(resource["Ref"])
    if "Fn::Sub" in resource:
        text = resource["Fn::Sub"]
        for name, value in {**PSEUDO, **bindings}.items():
            text = text.replace("${" + name + "}", value)
        return None if "${" in text else text
    return None


def listed(value):
    return value if isinstance(value, list) else [value]


def main(recording, template_path):
    template = cfn_yaml.load(template_path)
    policies = template["Resources"][ROLE]["Properties"]["Policies"]
    statements = [s for p in policies for s in p["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    denied, used, made = {}, set(), 0
    for action, arn, bindings in calls_of_the_function(recording):
        made += 1
        allowed = False
        for statement in statements:
            for granted in listed(statement["Action"]):
                if not fnmatch.fnmatchcase(action.lower(), granted.lower()):
                    continue
                for resource in listed(statement["Resource"]):
                    pattern = resolve(resource, bindings)
                    if pattern is not None and fnmatch.fnmatchcase(arn, pattern):
                        allowed = True
                        used.add((statement["Sid"], granted))
        if not allowed:
            resource = next(iter(bindings), arn)
            denied[(action, resource)] = denied.get((action, resource), 0) + 1
    unused = sorted(
        (s["Sid"], granted)
        for s in statements if s["Sid"] not in LAMBDA_OWN
        for granted in listed(s["Action"])
        if (s["Sid"], granted) not in used
    )
    print(f"check-permissions: {made} AWS calls of the function checked against {ROLE}")
    for (action, resource), calls in sorted(denied.items()):
        print(f"  not allowed: {action} on {resource} ({calls} calls)")
    for sid, granted in unused:
        print(f"  granted but never called by any test: {granted} ({sid})")
    if made == 0:
        print("  no call of the function was recorded: is AWS_CALLS_RECORDING set?")
    return 1 if denied or unused or made == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
