"""Least privilege, checked: every AWS call the function made during the tests, as moto recorded
it (`AWS_CALLS_RECORDING`, see scripts/with-moto.sh), must be allowed by the role the template
gives the function, and every action the role grants the function's code must have been made by
some test.

The function's calls are the ones whose user agent names it (`app/ecom-settings-exporter`, set in
`build_exporter`); the tests' own calls (creating tables, writing items) are not the function's.
Each call is bound to the template resource it stands for, or it fails the check as a call that
cannot be attributed:
- a settings table is one the recording shows created with a stream (`SettingsTableName`); its
  ledgers are `{settings}-ledger` and `{settings}-{name}-ledger` (a test's second ledger), or a
  name given with `--ledger SETTINGS=LEDGER` (`LedgerTable`); a call to any other table fails;
- a call naming a secondary index is a call on `table/{table}/index/{index}`, as IAM sees it;
- a secret is the `CloudflareApiTokenSecretId` parameter if the recording shows it created, by name
  (or its ARN), and a call for any other secret fails;
- a call with no `X-Amz-Target`, or of a service this script does not know, fails.
Each statement's resource is then resolved with those bindings and matched as IAM matches.

Usage: python scripts/check-permissions.py [--calls-only] [--ledger S=L] RECORDING.jsonl template.yaml
(exit 1 on a gap; --calls-only: no "granted but never called" check, for a recording of one run)
"""
import argparse
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
LAMBDA_OWN = {"ReadSettingsStream", "ListStreams", "ReportFailedRecords", "WriteOwnLogs", "WriteTraces"}


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


def created(entries):
    """Tables the recording shows created with a stream (the settings tables of the runs), and
    the secrets it shows created."""
    tables, secrets = set(), set()
    for headers, request in entries:
        target = headers.get("x-amz-target", "")
        if target.endswith(".CreateTable") and request.get("StreamSpecification", {}).get("StreamEnabled"):
            tables.add(request["TableName"])
        elif target == "secretsmanager.CreateSecret":
            secrets.add(request["Name"])
    return tables, secrets


def secret_name(secret_id):
    """A secret's name from its name or its ARN (`...:secret:{name}-{6 characters}`)."""
    if secret_id.startswith("arn:"):
        return secret_id.split(":secret:", 1)[-1][:-7]
    return secret_id


def parsed(recording):
    """(lower-cased headers, request body as JSON or None) of each recorded request."""
    for entry in recorded(recording):
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        body = entry.get("body") or ""
        if entry.get("body_encoded"):
            body = base64.b64decode(body).decode(errors="replace")
        try:
            request = json.loads(body or "{}")
        except ValueError:
            request = None
        yield headers, request if isinstance(request, dict) else {}


def bind_table(table, settings, ledgers):
    """The template parameter or resource a table stands for, or None."""
    if table in settings:
        return "SettingsTableName"
    if table in ledgers or (str(table).endswith("-ledger") and any(str(table).startswith(s + "-") for s in settings)):
        return "LedgerTable"
    return None


def dynamodb_calls(operation, request):
    """(action, table, index) of each single-table action a DynamoDB request makes."""
    if operation == "TransactWriteItems":
        # IAM authorises each action of a transaction as the single-item call it is.
        return [(TRANSACT_ACTIONS.get(kind, kind), action.get("TableName"), None)
                for item in request.get("TransactItems", []) for kind, action in item.items()]
    if "TableName" in request:
        return [(operation, request["TableName"], request.get("IndexName"))]
    return [(operation, table, None) for table in request.get("RequestItems", {})]


def calls_of_the_function(recording, extra_ledgers):
    """(action, resource ARN, bindings) of each call the function made; bindings None where the
    call cannot be attributed to a resource of the template."""
    entries = list(parsed(recording))
    settings, secrets = created(entries)
    ledgers = {table + "-ledger" for table in settings} | set(extra_ledgers)
    for headers, request in entries:
        agent = headers.get("x-amz-user-agent", "") + " " + headers.get("user-agent", "")
        if APP not in agent:
            continue
        if "x-amz-target" not in headers:
            yield "(no X-Amz-Target)", headers.get("host", "?"), None
            continue
        prefix, operation = headers["x-amz-target"].split(".", 1)
        if prefix.startswith("DynamoDB_"):
            for action, table, index in dynamodb_calls(operation, request):
                param = bind_table(table, settings, ledgers)
                arn = table_arn(str(table)) + (f"/index/{index}" if index else "")
                yield "dynamodb:" + action, arn, {param: table} if param else None
        elif prefix == "secretsmanager":
            secret = str(request.get("SecretId", ""))
            name = secret_name(secret)
            arn = secret if secret.startswith("arn:") else (
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:" + secret + "-AbCdEf")
            yield "secretsmanager:" + operation, arn, {"CloudflareApiTokenSecretId": name} if name in secrets else None
        else:
            yield prefix + ":" + operation, "*", None


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


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("recording")
    parser.add_argument("template")
    parser.add_argument("--calls-only", action="store_true")
    parser.add_argument("--ledger", action="append", default=[], metavar="SETTINGS=LEDGER")
    args = parser.parse_args(argv)
    template = cfn_yaml.load(args.template)
    policies = template["Resources"][ROLE]["Properties"]["Policies"]
    statements = [s for p in policies for s in p["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    extra_ledgers = [pair.split("=", 1)[1] for pair in args.ledger]
    denied, unattributed, used, made = {}, {}, set(), 0
    for action, arn, bindings in calls_of_the_function(args.recording, extra_ledgers):
        made += 1
        if bindings is None:
            unattributed[(action, arn)] = unattributed.get((action, arn), 0) + 1
            continue
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
            denied[(action, arn)] = denied.get((action, arn), 0) + 1
    unused = [] if args.calls_only else sorted(
        (s["Sid"], granted)
        for s in statements if s["Sid"] not in LAMBDA_OWN
        for granted in listed(s["Action"])
        if (s["Sid"], granted) not in used
    )
    print(f"check-permissions: {made} AWS calls of the function checked against {ROLE}")
    for (action, resource), calls in sorted(unattributed.items()):
        print(f"  cannot attribute: {action} on {resource} ({calls} calls), not a resource of the template")
    for (action, resource), calls in sorted(denied.items()):
        print(f"  not allowed: {action} on {resource} ({calls} calls)")
    for sid, granted in unused:
        print(f"  granted but never called by any test: {granted} ({sid})")
    if made == 0:
        print("  no call of the function was recorded: is AWS_CALLS_RECORDING set?")
    return 1 if denied or unattributed or unused or made == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
